//! `/api/v1/projects`: projects, their members and roles. Admins create
//! and archive projects; a project's owners manage its members.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use ud_core::project::ProjectCommand;
use ud_schemas::{streams, ProjectId, Role};
use utoipa::ToSchema;

use crate::auth::{project_of, Admin, Caller};
use crate::body::JsonBody;
use crate::error::{ApiError, ErrorBody};
use crate::tasks::WAIT_PROJECTED;
use crate::AppState;

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProject {
    /// 1-63 of a-z, 0-9 and '-', not starting with '-'.
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The user who owns it first.
    pub owner: String,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetMember {
    /// viewer, member or owner.
    pub role: String,
}

#[derive(Deserialize, Serialize, ToSchema, Debug)]
pub struct MemberView {
    pub user: String,
    pub role: Role,
    /// Since when the member has this role.
    pub since: DateTime<Utc>,
}

#[derive(Deserialize, Serialize, ToSchema, Debug)]
pub struct ProjectView {
    pub name: String,
    pub description: String,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    pub archived_at: Option<DateTime<Utc>>,
    /// The caller's role (admins: owner).
    pub your_role: Option<Role>,
    pub members: Vec<MemberView>,
}

/// Create a project with its first owner (admin).
#[utoipa::path(post, path = "/api/v1/projects", tag = "projects", request_body = CreateProject,
    responses((status = 201, body = ProjectView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, description = "a project of this name exists", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    Admin(caller): Admin,
    JsonBody(req): JsonBody<CreateProject>,
) -> Result<(StatusCode, Json<ProjectView>), ApiError> {
    let project: ProjectId = req
        .name
        .parse()
        .map_err(|e: ud_schemas::IdError| ApiError::field("name", e.to_string()))?;
    let command = ProjectCommand::Create {
        description: req.description,
        owner: req.owner,
    };
    changed(&state, &project, command, &caller).await?;
    Ok((
        StatusCode::CREATED,
        Json(view(&state, &caller, &project).await?),
    ))
}

/// Projects the caller may see, with its role in each.
#[utoipa::path(get, path = "/api/v1/projects", tag = "projects",
    responses((status = 200, body = [ProjectView])), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<ProjectView>>, ApiError> {
    let client = state.db.client().await?;
    let visible = caller.visible();
    let names: Vec<String> = client
        .query(
            "SELECT name FROM projects WHERE $1::text[] IS NULL OR name = ANY($1) ORDER BY name",
            &[&visible],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    drop(client);
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        if let Ok(p) = name.parse::<ProjectId>() {
            out.push(view(&state, &caller, &p).await?);
        }
    }
    Ok(Json(out))
}

/// A project with its members.
#[utoipa::path(get, path = "/api/v1/projects/{project}", tag = "projects",
    params(("project" = String, Path)),
    responses((status = 200, body = ProjectView), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
) -> Result<Json<ProjectView>, ApiError> {
    let project = project_of(&caller, &project, Role::Viewer)?;
    Ok(Json(view(&state, &caller, &project).await?))
}

/// Add a member to a project, or change a member's role (owners).
#[utoipa::path(put, path = "/api/v1/projects/{project}/members/{user}", tag = "projects",
    params(("project" = String, Path), ("user" = String, Path)), request_body = SetMember,
    responses((status = 200, body = ProjectView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "archived, or the last owner", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn set_member(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, user)): Path<(String, String)>,
    JsonBody(req): JsonBody<SetMember>,
) -> Result<Json<ProjectView>, ApiError> {
    let project = project_of(&caller, &project, Role::Owner)?;
    let role: Role = req
        .role
        .parse()
        .map_err(|e: String| ApiError::field("role", e))?;
    changed(
        &state,
        &project,
        ProjectCommand::SetMember { user, role },
        &caller,
    )
    .await?;
    Ok(Json(view(&state, &caller, &project).await?))
}

/// Remove a member from a project (owners).
#[utoipa::path(delete, path = "/api/v1/projects/{project}/members/{user}", tag = "projects",
    params(("project" = String, Path), ("user" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "archived, not a member, or the last owner", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn remove_member(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, user)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let project = project_of(&caller, &project, Role::Owner)?;
    changed(
        &state,
        &project,
        ProjectCommand::RemoveMember { user },
        &caller,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Archive a project (admin): its members read, no one writes.
#[utoipa::path(post, path = "/api/v1/projects/{project}/archive", tag = "projects",
    params(("project" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "archived already", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn archive(
    State(state): State<AppState>,
    Admin(caller): Admin,
    Path(project): Path<String>,
) -> Result<StatusCode, ApiError> {
    let project: ProjectId = project
        .parse()
        .map_err(|_| ApiError::not_found("project"))?;
    changed(&state, &project, ProjectCommand::Archive, &caller).await?;
    // No one writes in an archived project: its schedules stop too.
    let active: Vec<uuid::Uuid> = state
        .db
        .client()
        .await?
        .query(
            "SELECT id FROM schedules WHERE project = $1 AND state = 'active'",
            &[&project.as_str()],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut last = 0;
    for id in active {
        let pause = ud_core::schedule::ScheduleCommand::Pause {
            reason: format!("project {project} archived"),
        };
        match state
            .schedules
            .execute(ud_schemas::ScheduleId(id), pause, &caller.actor(), |_| true)
            .await
        {
            Ok(a) => last = last.max(a.seq),
            // Paused or deleted meanwhile: nothing to stop.
            Err(ud_core::CommandError::ScheduleRejected(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    state
        .projected
        .wait(streams::SCHEDULES, last, WAIT_PROJECTED)
        .await;
    Ok(StatusCode::NO_CONTENT)
}

/// Runs a project command and returns once the read model has it and the
/// roles of cached tokens are read again.
async fn changed(
    state: &AppState,
    project: &ProjectId,
    command: ProjectCommand,
    caller: &Caller,
) -> Result<(), ApiError> {
    let seq = ud_core::commands::project_command(
        state.commands.store(),
        project,
        command,
        &caller.actor(),
    )
    .await?;
    state
        .projected
        .wait(streams::AUTH, seq, WAIT_PROJECTED)
        .await;
    state.tokens.forget_all();
    Ok(())
}

async fn view(
    state: &AppState,
    caller: &Caller,
    project: &ProjectId,
) -> Result<ProjectView, ApiError> {
    let client = state.db.client().await?;
    let row = client
        .query_opt(
            "SELECT description, created_at, created_by, archived_at FROM projects WHERE name = $1",
            &[&project.as_str()],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("project"))?;
    let members = client
        .query(
            "SELECT user_name, role, since FROM project_members WHERE project = $1 ORDER BY user_name",
            &[&project.as_str()],
        )
        .await?
        .iter()
        .filter_map(|r| {
            Some(MemberView {
                user: r.get(0),
                role: r.get::<_, String>(1).parse().ok()?,
                since: r.get(2),
            })
        })
        .collect();
    Ok(ProjectView {
        name: project.to_string(),
        description: row.get(0),
        created_at: row.get(1),
        created_by: row.get(2),
        archived_at: row.get(3),
        your_role: caller.role(project.as_str()),
        members,
    })
}
