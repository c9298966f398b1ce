//! Event payloads, current version. Each event type has a subject suffix
//! (its name on the wire) and a schema version; older versions are upcast
//! in [`crate::codec`].

use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, PipelineId, ProjectId, ScheduleId, TaskId, TokenId};
use crate::spec::{NodeResources, PipelineStep, TaskSpec};
use crate::Millis;

/// Everything that happens to a task.
#[allow(clippy::large_enum_variant)] // built once per command or event, never stored in bulk
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum TaskEvent {
    Submitted(TaskSubmitted),
    Waiting(TaskWaiting),
    Assigned(TaskAssigned),
    Preparing(TaskPreparing),
    Prepared(TaskPrepared),
    Started(TaskStarted),
    Outputs(TaskOutputs),
    Succeeded(TaskSucceeded),
    Failed(TaskFailed),
    TimedOut(TaskTimedOut),
    Lost(TaskLost),
    Disconnected(TaskDisconnected),
    Reconnected(TaskReconnected),
    Retrying(TaskRetrying),
    Reprioritized(TaskReprioritized),
    CancelRequested(TaskCancelRequested),
    Cancelled(TaskCancelled),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSubmitted {
    pub at: Millis,
    pub project: ProjectId,
    pub spec: TaskSpec,
    pub idempotency_key: Option<String>,
}

/// The scheduler could not place a pending task, and says why (written
/// when the reason changes, not at every attempt).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskWaiting {
    pub at: Millis,
    pub reason: String,
    /// What it waits on, for programs: `quota <limit>` (tasks, cpus,
    /// memory, gpus, gpu-hours), `queue <name> at its limit`, `after
    /// <task>`, or what the nodes lack (added later: absent in older events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// The node running the task went offline: the task is pending again and
/// will be placed anew; the lost run is stopped if its node comes back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskLost {
    pub at: Millis,
    pub node_id: NodeId,
    pub attempt: u32,
    pub reason: String,
}

/// The node running the task went offline: the run is given until
/// `lost_at` to be heard from again before the task is lost and placed anew.
/// Its resources stay held on that node meanwhile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskDisconnected {
    pub at: Millis,
    pub node_id: NodeId,
    pub attempt: u32,
    pub lost_at: Millis,
}

/// The node of a disconnected task is back in time: the run goes on
/// (`running`: it had started; otherwise it is assigned, still preparing).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskReconnected {
    pub at: Millis,
    pub node_id: NodeId,
    pub attempt: u32,
    pub running: bool,
}

/// An attempt failed and the task's retry policy allows another: the task
/// is pending again, to be placed no earlier than `not_before`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRetrying {
    pub at: Millis,
    pub attempt: u32,
    pub exit_code: Option<i32>,
    pub reason: String,
    pub not_before: Millis,
}

/// The priority of a pending task was changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskReprioritized {
    pub at: Millis,
    pub priority: i32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskAssigned {
    pub at: Millis,
    pub node_id: NodeId,
    pub attempt: u32,
    /// The node's GPU devices (UUIDs) the run is given; absent when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<String>,
}

/// A preparing step began on the node (`fetch_code`, `fetch_environment`,
/// `build_image`, `checkout`, `fetch_inputs`, `restore_checkpoint`, `fetch_shared`,
/// `start`); the step before it ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskPreparing {
    pub at: Millis,
    pub node_id: NodeId,
    pub attempt: u32,
    pub step: String,
}

/// What a run really uses, recorded by the node before it starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskPrepared {
    pub at: Millis,
    pub node_id: NodeId,
    pub attempt: u32,
    pub code_commit_id: String,
    pub env_commit_id: String,
    /// Hex SHA-256 of the Dockerfile's bytes (empty when the node runs a fixed image).
    pub dockerfile_digest: String,
    pub image_id: String,
    /// Preparing steps in order, with their durations.
    pub steps: Vec<PrepareStep>,
    pub gpus: Vec<GpuInUse>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareStep {
    /// `fetch_code`, `fetch_environment`, `build_image`, `checkout`, `fetch_inputs`,
    /// `restore_checkpoint`, `fetch_shared`, `start`.
    pub name: String,
    pub millis: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInUse {
    pub model: String,
    pub driver: String,
    /// The device's UUID (absent in older events).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uuid: String,
}

/// The outputs a run left, stored in the object store (written by the node
/// after the run and before its outcome).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskOutputs {
    pub at: Millis,
    pub node_id: NodeId,
    pub attempt: u32,
    pub files: Vec<OutputObject>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputObject {
    /// Relative to the workspace.
    pub path: String,
    /// The object's key in the store.
    pub key: String,
    pub size: u64,
    /// Hex SHA-256 of its bytes.
    pub sha256: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStarted {
    pub at: Millis,
    pub node_id: NodeId,
    pub attempt: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSucceeded {
    pub at: Millis,
    pub exit_code: i32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskFailed {
    pub at: Millis,
    pub exit_code: Option<i32>,
    pub reason: String,
}

/// The run passed its time limit and was stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskTimedOut {
    pub at: Millis,
    pub timeout_seconds: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCancelRequested {
    pub at: Millis,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCancelled {
    pub at: Millis,
    pub reason: String,
}

/// Everything that happens to a compute node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum NodeEvent {
    Enrolled(NodeEnrolled),
    Revoked(NodeRevoked),
    Registered(NodeRegistered),
    Heartbeat(NodeHeartbeat),
    WentOffline(NodeWentOffline),
    Scheduling(NodeScheduling),
}

/// An operator changed whether the node takes new tasks: `active`,
/// `cordoned` (no new tasks) or `draining` (no new tasks; running ones
/// finish, then the node is empty for maintenance).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeScheduling {
    pub at: Millis,
    pub mode: crate::SchedulingMode,
    pub reason: String,
}

/// An admin enrolled a node; its secret is kept only as a bcrypt hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEnrolled {
    pub at: Millis,
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub secret_hash: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRevoked {
    pub at: Millis,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRegistered {
    pub at: Millis,
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub resources: NodeResources,
}

/// Schema version 2 (version 1 had no disk fields; see `codec::v1`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeHeartbeat {
    pub at: Millis,
    pub running_tasks: u32,
    /// Free space where the node keeps caches and workspaces (unknown in v1).
    pub disk_free_mb: Option<u64>,
    /// The node is below its free-space threshold and takes no new tasks.
    pub low_disk: bool,
    /// The GPU devices (UUIDs) the node sees now; absent when it does not
    /// say (no GPUs, or an older agent). A device it registered and no
    /// longer sees takes no new tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeWentOffline {
    pub at: Millis,
    pub last_seen: Millis,
}

/// Issuing and revoking API tokens. Only the SHA-256 digest of a token's
/// secret is ever recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum AuthEvent {
    TokenIssued(TokenIssued),
    TokenRevoked(TokenRevoked),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenIssued {
    pub at: Millis,
    pub name: String,
    /// Hex SHA-256 of the secret.
    pub digest: String,
    pub projects: Vec<ProjectId>,
    pub admin: bool,
    /// The person the token belongs to: it carries that user's roles in
    /// the projects they are a member of (added later: absent on tokens
    /// that name their projects themselves).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// When the token stops working (added later: absent means never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Millis>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRevoked {
    pub at: Millis,
}

/// What a member may do in a project. Ordered: each role may do what
/// the ones before it may.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads the project's tasks, pipelines, schedules, files and usage.
    Viewer,
    /// Also submits, and cancels or changes its own tasks.
    Member,
    /// Also manages members, secrets, webhooks and anyone's tasks.
    Owner,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Member, Role::Owner];

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Member => "member",
            Self::Owner => "owner",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("no role {s:?}: one of viewer, member, owner"))
    }
}

/// A project as an aggregate: created, its members and their roles,
/// archived.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ProjectEvent {
    Created(ProjectCreated),
    MemberAdded(ProjectMemberAdded),
    RoleChanged(ProjectRoleChanged),
    MemberRemoved(ProjectMemberRemoved),
    Archived(ProjectArchived),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectCreated {
    pub at: Millis,
    #[serde(default)]
    pub description: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectMemberAdded {
    pub at: Millis,
    pub user: String,
    pub role: Role,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectRoleChanged {
    pub at: Millis,
    pub user: String,
    pub role: Role,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectMemberRemoved {
    pub at: Millis,
    pub user: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectArchived {
    pub at: Millis,
}

impl ProjectEvent {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Created(_) => "created",
            Self::MemberAdded(_) => "member_added",
            Self::RoleChanged(_) => "role_changed",
            Self::MemberRemoved(_) => "member_removed",
            Self::Archived(_) => "archived",
        }
    }
}

/// Setting and deleting a project secret. Only its name and version are
/// recorded; the value is kept encrypted in KV bucket `ud_secrets`, never in
/// a stream that keeps history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum SecretEvent {
    Set(SecretSet),
    Deleted(SecretDeleted),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretSet {
    pub at: Millis,
    /// 1 for the first value, one more for each value set after it.
    pub version: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretDeleted {
    pub at: Millis,
    /// The version deleted.
    pub version: u32,
}

/// A project secret: the aggregate of secret events.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SecretRef {
    pub project: ProjectId,
    /// Also the environment variable a run gets it as (see [`crate::spec::secret_name`]).
    pub name: String,
}

impl std::fmt::Display for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.project, self.name)
    }
}

/// Everything that happens to a pipeline (`ud.pipeline.<id>.<event>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum PipelineEvent {
    Submitted(PipelineSubmitted),
    StepsStarted(PipelineStepsStarted),
    StepEnded(PipelineStepEnded),
    StepSkipped(PipelineStepSkipped),
    CancelRequested(PipelineCancelRequested),
    Rerun(PipelineRerun),
    Ended(PipelineEnded),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineSubmitted {
    pub at: Millis,
    pub project: ProjectId,
    pub name: Option<String>,
    /// As submitted: a matrix step is one entry.
    pub steps: Vec<PipelineStep>,
    pub idempotency_key: Option<String>,
}

/// Steps started together (a fan-out is one event): each step's task is
/// created with the id given here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineStepsStarted {
    pub at: Millis,
    pub steps: Vec<StepStart>,
}

/// One step started: its `run`-th task, counting reruns from 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepStart {
    /// The step as expanded (`train[0.1]` for a matrix step).
    pub step: String,
    pub task: TaskId,
    pub run: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineStepEnded {
    pub at: Millis,
    pub step: String,
    pub task: TaskId,
    pub outcome: StepOutcome,
}

/// How a step's task ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepOutcome {
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
}

impl StepOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
            Self::Cancelled => "cancelled",
        }
    }
}

/// A step that will not run in this run of the pipeline, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineStepSkipped {
    pub at: Millis,
    pub step: String,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineCancelRequested {
    pub at: Millis,
    pub reason: String,
}

/// An ended pipeline runs again: these steps (expanded names) wait anew;
/// the others keep how they ended, and their outputs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineRerun {
    pub at: Millis,
    pub steps: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineEnded {
    pub at: Millis,
    pub outcome: PipelineOutcome,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PipelineOutcome {
    /// No step failed, timed out or was cancelled.
    Succeeded,
    Failed,
    Cancelled,
}

impl PipelineOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Everything that happens to a schedule (`ud.schedule.<id>.<event>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ScheduleEvent {
    Created(ScheduleCreated),
    Fired(ScheduleFired),
    Skipped(ScheduleSkipped),
    Paused(SchedulePaused),
    Resumed(ScheduleResumed),
    Deleted(ScheduleDeleted),
}

/// A schedule was made: what it submits (a task or a pipeline, as the
/// body of its REST call) at the times of `cron` in `timezone`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleCreated {
    pub at: Millis,
    pub project: ProjectId,
    pub name: String,
    /// Five fields (minute hour day-of-month month day-of-week), or six
    /// with seconds first.
    pub cron: String,
    /// An IANA time zone, e.g. `Europe/Berlin`.
    pub timezone: String,
    pub missed: Missed,
    /// The body of `POST /api/v1/tasks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<serde_json::Value>,
    /// The body of `POST /api/v1/pipelines`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<serde_json::Value>,
}

/// What becomes of the times a schedule passed while no main server ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Missed {
    /// They are skipped (recorded as skipped); the next time runs.
    Skip,
    /// Each of them runs, oldest first.
    CatchUp,
}

impl Missed {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Skip => "skip",
            Self::CatchUp => "catch_up",
        }
    }
}

/// One time of a schedule came: what it submitted, or why it could not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleFired {
    pub at: Millis,
    /// The time of the schedule this is for.
    pub due: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<TaskId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_id: Option<PipelineId>,
    /// Why nothing was submitted (the body is no longer accepted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Times of the schedule that passed while no main server ran, skipped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleSkipped {
    pub at: Millis,
    pub first: Millis,
    pub last: Millis,
    pub count: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedulePaused {
    pub at: Millis,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleResumed {
    pub at: Millis,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleDeleted {
    pub at: Millis,
}

impl ScheduleEvent {
    pub fn at(&self) -> Millis {
        match self {
            Self::Created(e) => e.at,
            Self::Fired(e) => e.at,
            Self::Skipped(e) => e.at,
            Self::Paused(e) => e.at,
            Self::Resumed(e) => e.at,
            Self::Deleted(e) => e.at,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Created(_) => "created",
            Self::Fired(_) => "fired",
            Self::Skipped(_) => "skipped",
            Self::Paused(_) => "paused",
            Self::Resumed(_) => "resumed",
            Self::Deleted(_) => "deleted",
        }
    }
}

/// Any event, with the aggregate it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // built once per command or event, never stored in bulk
pub enum Event {
    Task(crate::TaskId, TaskEvent),
    Node(NodeId, NodeEvent),
    Auth(TokenId, AuthEvent),
    Secret(SecretRef, SecretEvent),
    Pipeline(PipelineId, PipelineEvent),
    Schedule(ScheduleId, ScheduleEvent),
    Project(ProjectId, ProjectEvent),
}

impl TaskEvent {
    /// The last subject token, e.g. `submitted` in `ud.task.<id>.submitted`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Submitted(_) => "submitted",
            Self::Waiting(_) => "waiting",
            Self::Assigned(_) => "assigned",
            Self::Preparing(_) => "preparing",
            Self::Prepared(_) => "prepared",
            Self::Outputs(_) => "outputs",
            Self::Started(_) => "started",
            Self::Succeeded(_) => "succeeded",
            Self::Failed(_) => "failed",
            Self::TimedOut(_) => "timed_out",
            Self::Lost(_) => "lost",
            Self::Disconnected(_) => "disconnected",
            Self::Reconnected(_) => "reconnected",
            Self::Retrying(_) => "retrying",
            Self::Reprioritized(_) => "reprioritized",
            Self::CancelRequested(_) => "cancel_requested",
            Self::Cancelled(_) => "cancelled",
        }
    }
    pub fn at(&self) -> Millis {
        match self {
            Self::Submitted(e) => e.at,
            Self::Waiting(e) => e.at,
            Self::Assigned(e) => e.at,
            Self::Preparing(e) => e.at,
            Self::Prepared(e) => e.at,
            Self::Outputs(e) => e.at,
            Self::Started(e) => e.at,
            Self::Succeeded(e) => e.at,
            Self::Failed(e) => e.at,
            Self::TimedOut(e) => e.at,
            Self::Lost(e) => e.at,
            Self::Disconnected(e) => e.at,
            Self::Reconnected(e) => e.at,
            Self::Retrying(e) => e.at,
            Self::Reprioritized(e) => e.at,
            Self::CancelRequested(e) => e.at,
            Self::Cancelled(e) => e.at,
        }
    }
}

impl NodeEvent {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Enrolled(_) => "enrolled",
            Self::Revoked(_) => "revoked",
            Self::Registered(_) => "registered",
            Self::Heartbeat(_) => "heartbeat",
            Self::WentOffline(_) => "offline",
            Self::Scheduling(_) => "scheduling",
        }
    }
}

impl AuthEvent {
    pub fn name(&self) -> &'static str {
        match self {
            Self::TokenIssued(_) => "issued",
            Self::TokenRevoked(_) => "revoked",
        }
    }
}

impl SecretEvent {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Set(_) => "set",
            Self::Deleted(_) => "deleted",
        }
    }
}

impl PipelineEvent {
    pub fn at(&self) -> Millis {
        match self {
            Self::Submitted(e) => e.at,
            Self::StepsStarted(e) => e.at,
            Self::StepEnded(e) => e.at,
            Self::StepSkipped(e) => e.at,
            Self::CancelRequested(e) => e.at,
            Self::Rerun(e) => e.at,
            Self::Ended(e) => e.at,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Submitted(_) => "submitted",
            Self::StepsStarted(_) => "steps_started",
            Self::StepEnded(_) => "step_ended",
            Self::StepSkipped(_) => "step_skipped",
            Self::CancelRequested(_) => "cancel_requested",
            Self::Rerun(_) => "rerun",
            Self::Ended(_) => "ended",
        }
    }
}

impl Event {
    /// `task.submitted`, `node.heartbeat`, ...: the `Ud-Event-Type` header.
    pub fn event_type(&self) -> String {
        match self {
            Self::Task(_, e) => format!("task.{}", e.name()),
            Self::Node(_, e) => format!("node.{}", e.name()),
            Self::Auth(_, e) => format!("token.{}", e.name()),
            Self::Secret(_, e) => format!("secret.{}", e.name()),
            Self::Pipeline(_, e) => format!("pipeline.{}", e.name()),
            Self::Schedule(_, e) => format!("schedule.{}", e.name()),
            Self::Project(_, e) => format!("project.{}", e.name()),
        }
    }

    /// The subject this event is published on.
    pub fn subject(&self) -> String {
        match self {
            Self::Task(id, e) => crate::subjects::task_event(id, e.name()),
            Self::Node(id, e) => crate::subjects::node_event(id, e.name()),
            Self::Auth(id, e) => crate::subjects::token_event(id, e.name()),
            Self::Secret(s, e) => crate::subjects::secret_event(s, e.name()),
            Self::Pipeline(id, e) => crate::subjects::pipeline_event(id, e.name()),
            Self::Schedule(id, e) => crate::subjects::schedule_event(id, e.name()),
            Self::Project(p, e) => crate::subjects::project_event(p, e.name()),
        }
    }

    /// The aggregate id as text (task, node, pipeline or token id; `project/NAME` of a secret).
    pub fn aggregate_id(&self) -> String {
        match self {
            Self::Task(id, _) => id.to_string(),
            Self::Node(id, _) => id.to_string(),
            Self::Auth(id, _) => id.to_string(),
            Self::Secret(s, _) => s.to_string(),
            Self::Pipeline(id, _) => id.to_string(),
            Self::Schedule(id, _) => id.to_string(),
            Self::Project(p, _) => p.to_string(),
        }
    }
}
