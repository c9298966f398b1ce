//! `/api/v1/tasks`: submit, read, history, cancel.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use ud_core::validate::SubmitTask;
use ud_projections::rows::TaskRow;
use ud_schemas::{codec, streams, subjects, TaskId};
use utoipa::{IntoParams, ToSchema};

use crate::auth::Caller;
use crate::body::JsonBody;
use crate::error::{ApiError, ErrorBody};
use crate::AppState;
use ud_schemas::Role;

/// How long `wait=projected` waits before answering without the projection.
pub const WAIT_PROJECTED: Duration = Duration::from_secs(5);

#[derive(Deserialize, IntoParams)]
pub struct WriteParams {
    /// `projected`: answer only once the read models include this write.
    pub wait: Option<String>,
}

impl WriteParams {
    pub(crate) fn wants_projection(&self) -> Result<bool, ApiError> {
        match self.wait.as_deref() {
            None => Ok(false),
            Some("projected") => Ok(true),
            Some(other) => Err(ApiError::field(
                "wait",
                format!("unknown value {other:?}; use 'projected'"),
            )),
        }
    }
}

/// The answer to an accepted command.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct Accepted {
    pub task_id: String,
    /// False when an earlier request with the same Idempotency-Key created the task.
    pub created: bool,
    /// Stream sequence of the command's last event.
    pub seq: u64,
    /// True when the read models already include this write.
    pub projected: bool,
}

/// A task as the read model holds it.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct TaskView {
    pub id: String,
    pub project: String,
    pub name: Option<String>,
    pub state: ud_schemas::TaskStatus,
    pub node_id: Option<String>,
    pub attempt: i32,
    #[schema(value_type = ud_schemas::TaskSpec)]
    pub spec: serde_json::Value,
    /// What the run really used: resolved commits, Dockerfile digest, image id,
    /// preparing steps with their durations, GPUs (null until prepared).
    pub prepared: Option<serde_json::Value>,
    /// While the node prepares the run: `{"step", "since", "attempt"}`, the
    /// step under way (fetch_code, fetch_environment, build_image, checkout, fetch_inputs,
    /// start) and when it began; null otherwise.
    pub preparing: Option<serde_json::Value>,
    /// Why a pending task is not placed yet, as the scheduler last said
    /// (null once placed, and before the scheduler has looked at it).
    pub waiting_reason: Option<String>,
    /// Current priority: higher first; equal priorities share capacity fairly between projects.
    pub priority: i32,
    pub exit_code: Option<i32>,
    pub reason: Option<String>,
    pub submitted_by: String,
    pub submitted_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Events applied to this task; grows with every change.
    pub version: i64,
    /// What the last run left in the object store, with download links (in
    /// `GET /api/v1/tasks/{id}`; empty in lists).
    pub outputs: Vec<crate::files::OutputView>,
    /// The whole log in the object store, once the task has ended and it is
    /// archived (in `GET /api/v1/tasks/{id}`; null in lists).
    pub log_archive: Option<crate::files::SignedUrl>,
}

impl From<TaskRow> for TaskView {
    fn from(r: TaskRow) -> Self {
        Self {
            id: r.id.to_string(),
            project: r.project,
            name: r.name,
            state: r.state,
            node_id: r.node_id.map(|n| n.to_string()),
            attempt: r.attempt,
            spec: r.spec,
            prepared: r.prepared,
            preparing: r.preparing,
            waiting_reason: r.waiting_reason,
            priority: r.priority,
            exit_code: r.exit_code,
            reason: r.reason,
            submitted_by: r.submitted_by,
            submitted_at: r.submitted_at,
            updated_at: r.updated_at,
            finished_at: r.finished_at,
            version: r.version,
            outputs: vec![],
            log_archive: None,
        }
    }
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct TaskPage {
    pub items: Vec<TaskView>,
    /// Pass as `before` to get the next (older) page; null on the last page.
    pub next: Option<String>,
}

#[derive(Deserialize, IntoParams)]
pub struct ListParams {
    pub state: Option<String>,
    pub project: Option<String>,
    pub node: Option<String>,
    pub queue: Option<String>,
    /// Tasks submitted before this task id (paging cursor).
    pub before: Option<String>,
    /// Page size, 1-500 (default 50).
    pub limit: Option<i64>,
    /// Answer once the read model includes `UD_TASKS` up to this sequence
    /// (waiting at most 5 s): pass the `seq` of the last live event seen.
    pub projected_seq: Option<u64>,
}

#[derive(Deserialize, IntoParams)]
pub struct GetParams {
    /// Answer once the read model includes `UD_TASKS` up to this sequence
    /// (waiting at most 5 s): pass the `seq` of the last live event seen.
    pub projected_seq: Option<u64>,
}

fn parse_task_id(id: &str) -> Result<TaskId, ApiError> {
    id.parse().map_err(|_| ApiError::not_found("task"))
}

/// The task `id` names, as the read model has it, if the caller may see it
/// (404 otherwise, as for a task that does not exist).
pub(crate) async fn visible(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<ud_projections::rows::TaskRow, ApiError> {
    let id = parse_task_id(id)?;
    let client = state.db.client().await?;
    ud_projections::db::get_task(&client, id)
        .await?
        .filter(|r| caller.may_see(&r.project))
        .ok_or_else(|| ApiError::not_found("task"))
}

/// The answer to an accepted write: `body`, told whether the read models
/// include it (waiting for `seq` of `stream` when asked to), and where what
/// it wrote is read.
pub(crate) async fn written<T: Serialize>(
    state: &AppState,
    (stream, seq): (&str, u64),
    wait: bool,
    status: StatusCode,
    location: String,
    body: impl FnOnce(bool) -> T,
) -> Response {
    let projected = wait && state.projected.wait(stream, seq, WAIT_PROJECTED).await;
    let mut resp = (status, Json(body(projected))).into_response();
    if let Ok(loc) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(axum::http::header::LOCATION, loc);
    }
    resp
}

async fn respond_accepted(
    state: &AppState,
    a: ud_core::commands::Accepted,
    wait: bool,
    status: StatusCode,
) -> Response {
    let location = format!("/api/v1/tasks/{}", a.task_id);
    written(
        state,
        (streams::TASKS, a.seq),
        wait,
        status,
        location,
        |projected| Accepted {
            task_id: a.task_id.to_string(),
            created: a.created,
            seq: a.seq,
            projected,
        },
    )
    .await
}

/// Submit a task.
#[utoipa::path(post, path = "/api/v1/tasks", tag = "tasks",
    request_body = SubmitTask,
    params(WriteParams, ("Idempotency-Key" = Option<String>, Header, description = "Repeating a key returns the first task and appends nothing")),
    responses(
        (status = 202, description = "accepted", body = Accepted),
        (status = 400, description = "invalid request; `fields` names each rejected field", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 422, description = "Idempotency-Key reused with another request", body = ErrorBody),
        (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn submit(
    State(state): State<AppState>,
    caller: Caller,
    Query(params): Query<WriteParams>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<SubmitTask>,
) -> Result<Response, ApiError> {
    let wait = params.wants_projection()?;
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::field("Idempotency-Key", "must be printable ASCII"))?,
        ),
    };
    let accepted = state
        .commands
        .submit(&req, key, &caller.actor(), |p| {
            caller.may(p.as_str(), Role::Member)
        })
        .await?;
    let mut resp = respond_accepted(&state, accepted, wait, StatusCode::ACCEPTED).await;
    if !accepted.created {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

#[derive(Deserialize, Serialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    pub reason: Option<String>,
}

/// Cancel a task: a pending task is cancelled at once, a running one is stopped by its node.
#[utoipa::path(post, path = "/api/v1/tasks/{id}/cancel", tag = "tasks",
    params(("id" = String, Path), WriteParams),
    request_body(content = Option<CancelRequest>),
    responses((status = 202, body = Accepted), (status = 404, body = ErrorBody),
        (status = 409, description = "finished already, or changed concurrently", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(params): Query<WriteParams>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let wait = params.wants_projection()?;
    let id = parse_task_id(&id)?;
    let req: CancelRequest = crate::body::parse_or_default(&body)?;
    may_change(&state, &caller, &id).await?;
    let reason = req
        .reason
        .unwrap_or_else(|| format!("cancelled by {}", caller.actor()));
    let accepted = state
        .commands
        .cancel(id, &reason, &caller.actor(), |p| caller.may_see(p.as_str()))
        .await?;
    Ok(respond_accepted(&state, accepted, wait, StatusCode::ACCEPTED).await)
}

/// Submit a task's spec again as a new task (same versions, command,
/// resources, inputs and outputs); the new task's id is in the answer.
#[utoipa::path(post, path = "/api/v1/tasks/{id}/rerun", tag = "tasks",
    params(("id" = String, Path), WriteParams),
    responses((status = 202, body = Accepted), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn rerun(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(params): Query<WriteParams>,
) -> Result<Response, ApiError> {
    let wait = params.wants_projection()?;
    let id = parse_task_id(&id)?;
    // From the stream (the source of truth), so a task submitted a moment
    // ago can be rerun before the read model has it.
    let (task, _) = state
        .commands
        .store()
        .load_task(&id)
        .await
        .map_err(ApiError::unavailable)?
        .filter(|(t, _)| caller.may_see(t.project.as_str()))
        .ok_or_else(|| ApiError::not_found("task"))?;
    caller.require(task.project.as_str(), Role::Member)?;
    let req = ud_core::validate::rerun_request(task.project.as_str(), task.id, &task.spec);
    let accepted = state
        .commands
        .submit(&req, None, &caller.actor(), |p| {
            caller.may(p.as_str(), Role::Member)
        })
        .await?;
    Ok(respond_accepted(&state, accepted, wait, StatusCode::ACCEPTED).await)
}

#[derive(Deserialize, Serialize, ToSchema)]
pub struct ProjectCancelled {
    /// Tasks a cancel was recorded for (pending ones end at once, running ones are stopped by their node).
    pub cancelled: Vec<String>,
    /// Tasks that finished meanwhile.
    pub skipped: Vec<String>,
}

/// Cancel every unfinished task of a project (as the read model has them now).
#[utoipa::path(post, path = "/api/v1/projects/{project}/cancel", tag = "tasks",
    params(("project" = String, Path)),
    request_body(content = Option<CancelRequest>),
    responses((status = 200, body = ProjectCancelled), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn cancel_project(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<ProjectCancelled>, ApiError> {
    crate::auth::project_of(&caller, &project, Role::Owner)?;
    let default_reason = format!("project {project} cancelled by {}", caller.actor());
    cancel_many(&state, &caller, Some(&project), None, &body, default_reason).await
}

/// Cancel every unfinished task of a queue in the projects the caller owns.
#[utoipa::path(post, path = "/api/v1/queues/{queue}/cancel", tag = "tasks",
    params(("queue" = String, Path)),
    request_body(content = Option<CancelRequest>),
    responses((status = 200, body = ProjectCancelled)),
    security(("bearer" = [])))]
pub async fn cancel_queue(
    State(state): State<AppState>,
    caller: Caller,
    Path(queue): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<ProjectCancelled>, ApiError> {
    let default_reason = format!("queue {queue} cancelled by {}", caller.actor());
    cancel_many(&state, &caller, None, Some(&queue), &body, default_reason).await
}

async fn cancel_many(
    state: &AppState,
    caller: &Caller,
    project: Option<&str>,
    queue: Option<&str>,
    body: &[u8],
    default_reason: String,
) -> Result<Json<ProjectCancelled>, ApiError> {
    let req: CancelRequest = crate::body::parse_or_default(body)?;
    let reason = req.reason.unwrap_or(default_reason);
    let tasks = {
        let client = state.db.client().await?;
        ud_projections::db::unfinished_tasks(&client, project, queue).await?
    };
    let mut out = ProjectCancelled {
        cancelled: Vec::new(),
        skipped: Vec::new(),
    };
    let mut last = 0;
    for (id, _) in tasks
        .into_iter()
        .filter(|(_, p)| caller.may(p, Role::Owner))
    {
        match state
            .commands
            .cancel(id, &reason, &caller.actor(), |p| caller.may_see(p.as_str()))
            .await
        {
            Ok(a) => {
                last = last.max(a.seq);
                out.cancelled.push(id.to_string());
            }
            Err(ud_core::CommandError::Rejected(_) | ud_core::CommandError::NotFound) => {
                out.skipped.push(id.to_string())
            }
            Err(e) => return Err(e.into()),
        }
    }
    // Read your writes: the answer comes once the read models show the cancels.
    state
        .projected
        .wait(ud_schemas::streams::TASKS, last, WAIT_PROJECTED)
        .await;
    Ok(Json(out))
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PriorityRequest {
    /// -1000 to 1000; higher first.
    pub priority: i64,
}

/// Change the priority of a pending task.
#[utoipa::path(post, path = "/api/v1/tasks/{id}/priority", tag = "tasks",
    params(("id" = String, Path), WriteParams),
    request_body = PriorityRequest,
    responses((status = 202, body = Accepted), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "not pending any more, or changed concurrently", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn priority(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(params): Query<WriteParams>,
    crate::body::JsonBody(req): crate::body::JsonBody<PriorityRequest>,
) -> Result<Response, ApiError> {
    let wait = params.wants_projection()?;
    let id = parse_task_id(&id)?;
    let priority = ud_core::validate::priority_value(req.priority)
        .map_err(|f| ApiError::field(&f.field, &f.reason))?;
    may_change(&state, &caller, &id).await?;
    let accepted = state
        .commands
        .execute(
            id,
            ud_core::task::TaskCommand::Reprioritize { priority },
            &caller.actor(),
            |p| caller.may_see(p.as_str()),
        )
        .await?;
    Ok(respond_accepted(&state, accepted, wait, StatusCode::ACCEPTED).await)
}

/// 404 unless the caller may see the task, 403 unless it may change it:
/// members change their own tasks, owners (and admins) anyone's. Read
/// from the task's stream, so a task submitted a moment ago counts.
pub(crate) async fn may_change(
    state: &AppState,
    caller: &Caller,
    id: &ud_schemas::TaskId,
) -> Result<(), ApiError> {
    if caller.admin {
        return Ok(());
    }
    let (project, by) = state
        .commands
        .store()
        .task_origin(id)
        .await
        .map_err(ApiError::unavailable)?
        .ok_or_else(|| ApiError::not_found("task"))?;
    caller.require_own("task", project.as_str(), &by, Role::Member)
}

/// One task from the read model.
#[utoipa::path(get, path = "/api/v1/tasks/{id}", tag = "tasks", params(("id" = String, Path), GetParams),
    responses((status = 200, body = TaskView), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<GetParams>,
) -> Result<Json<TaskView>, ApiError> {
    crate::paging::caught_up(&state, streams::TASKS, q.projected_seq).await;
    let row = visible(&state, &caller, &id).await?;
    // Where the task's files are: the store it names, or its project's.
    let named = row.spec.get("store").and_then(|s| s.as_str());
    let storage = state.stores.of(&row.project, named).ok();
    let outputs = crate::files::outputs(storage, row.outputs.as_ref()).await;
    let archive = match row.finished_at {
        Some(_) => crate::files::log_archive(storage, &row.project, &row.id).await,
        None => None,
    };
    let mut view = TaskView::from(row);
    view.outputs = outputs;
    view.log_archive = archive;
    Ok(Json(view))
}

/// Tasks the token may see, newest first.
#[utoipa::path(get, path = "/api/v1/tasks", tag = "tasks", params(ListParams),
    responses((status = 200, body = TaskPage), (status = 400, body = ErrorBody)), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(p): Query<ListParams>,
) -> Result<Json<TaskPage>, ApiError> {
    let limit = crate::paging::limit(p.limit)?;
    let state_filter = match &p.state {
        Some(s) => Some(
            s.parse::<ud_schemas::TaskStatus>()
                .map_err(|e| ApiError::field("state", format!("unknown state: {e}")))?,
        ),
        None => None,
    };
    let node = match &p.node {
        Some(n) => Some(
            n.parse::<uuid::Uuid>()
                .map_err(|_| ApiError::field("node", "not a node id"))?,
        ),
        None => None,
    };
    let before = crate::paging::before(p.before.as_deref(), "task")?;
    crate::paging::caught_up(&state, streams::TASKS, p.projected_seq).await;
    let projects = caller.visible();
    let filter = ud_projections::db::TaskFilter {
        state: state_filter,
        project: p.project.clone(),
        node,
        before,
        projects,
        queue: p.queue.clone(),
        limit: limit + 1,
    };
    let client = state.db.client().await?;
    let mut rows = ud_projections::db::list_tasks(&client, &filter).await?;
    let next = crate::paging::cut(&mut rows, limit, |r| r.id.to_string());
    Ok(Json(TaskPage {
        items: rows.into_iter().map(TaskView::from).collect(),
        next,
    }))
}

/// One event of a task's history, decoded.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct HistoryEvent {
    pub seq: u64,
    pub subject: String,
    /// e.g. `task.submitted`.
    #[serde(rename = "type")]
    pub event_type: String,
    pub schema_version: u16,
    pub event_id: String,
    pub correlation_id: String,
    pub causation_id: Option<String>,
    pub actor: String,
    pub stored_at: String,
    /// The event's payload as JSON.
    pub data: serde_json::Value,
}

impl From<ud_core::store::StoredEvent> for HistoryEvent {
    fn from(e: ud_core::store::StoredEvent) -> Self {
        let m = &e.envelope.meta;
        Self {
            seq: e.seq,
            subject: e.subject.clone(),
            event_type: e.envelope.event.event_type(),
            schema_version: e.envelope.schema_version,
            event_id: m.event_id.to_string(),
            correlation_id: m.correlation_id.to_string(),
            causation_id: m.causation_id.map(|c| c.to_string()),
            actor: m.actor.clone(),
            stored_at: e.stored_at.clone(),
            data: codec::event_data_json(&e.envelope.event),
        }
    }
}

/// The task's whole history, read from the event stream (not the read model).
#[utoipa::path(get, path = "/api/v1/tasks/{id}/events", tag = "tasks", params(("id" = String, Path)),
    responses((status = 200, body = [HistoryEvent]), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn history(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vec<HistoryEvent>>, ApiError> {
    let id = parse_task_id(&id)?;
    let events = state
        .commands
        .store()
        .read_subject(streams::TASKS, &subjects::task_all(&id))
        .await
        .map_err(ApiError::unavailable)?;
    let visible = events.first().is_some_and(|e| match &e.envelope.event {
        ud_schemas::Event::Task(_, ud_schemas::TaskEvent::Submitted(s)) => {
            caller.may_see(s.project.as_str())
        }
        _ => false,
    });
    if !visible {
        return Err(ApiError::not_found("task"));
    }
    Ok(Json(events.into_iter().map(HistoryEvent::from).collect()))
}

#[derive(Deserialize, IntoParams)]
pub struct LogParams {
    /// Only chunks after this log sequence (from a previous answer's `next`).
    pub after: Option<u64>,
    /// Seconds to wait for new output when there is none yet (long poll, at most 30).
    pub wait: Option<u64>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct LogLine {
    pub seq: u64,
    pub at: i64,
    pub attempt: u32,
    /// stdout or stderr.
    pub stream: String,
    pub text: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct LogPage {
    pub lines: Vec<LogLine>,
    /// Pass as `after` to continue.
    pub next: u64,
}

async fn read_logs(state: &AppState, id: &TaskId, after: u64) -> Result<Vec<LogLine>, ApiError> {
    let chunks = state
        .commands
        .store()
        .log_chunks(id, after, 5000)
        .await
        .map_err(ApiError::unavailable)?;
    Ok(chunks
        .into_iter()
        .map(|(seq, c)| LogLine {
            seq,
            at: c.at,
            attempt: c.attempt,
            stream: c.stream,
            text: c.text,
        })
        .collect())
}

/// The task's output, from the log stream; with `wait`, answers when new output arrives.
#[utoipa::path(get, path = "/api/v1/tasks/{id}/logs", tag = "tasks", params(("id" = String, Path), LogParams),
    responses((status = 200, body = LogPage), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn logs(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(p): Query<LogParams>,
) -> Result<Json<LogPage>, ApiError> {
    let id = visible(&state, &caller, &id).await?.id;
    let after = p.after.unwrap_or(0);
    // Subscribe before reading, so nothing falls between the read and the wait.
    let mut sub = state
        .commands
        .store()
        .client()
        .subscribe(ud_schemas::subjects::log(&id))
        .await
        .map_err(ApiError::unavailable)?;
    let mut lines = read_logs(&state, &id, after).await?;
    if lines.is_empty() {
        if let Some(wait) = p.wait.filter(|w| *w > 0) {
            let _ = tokio::time::timeout(
                Duration::from_secs(wait.min(30)),
                futures::StreamExt::next(&mut sub),
            )
            .await;
            lines = read_logs(&state, &id, after).await?;
        }
    }
    let next = lines.last().map_or(after, |l| l.seq);
    Ok(Json(LogPage { lines, next }))
}
