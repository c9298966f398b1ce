//! What users and integrations send: the REST bodies and NATS command
//! payloads (JSON), and what the API stores for them. The OpenAPI document is
//! generated from these types; `ud_core::validate` turns them into specs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A schedule as a user makes it (`POST /api/v1/schedules`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSchedule {
    /// 1-63 of a-z, 0-9, `-` and `_`.
    pub name: String,
    /// Five fields (minute hour day-of-month month day-of-week), or six
    /// with seconds first; `@daily`, `@hourly`, ... too.
    pub cron: String,
    /// An IANA time zone the expression is read in (default `UTC`).
    #[serde(default)]
    pub timezone: Option<String>,
    /// `skip` (default) or `catch_up`: what becomes of the times that
    /// passed while no main server ran.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub missed: Option<crate::events::Missed>,
    /// The task submitted at each time (the body of `POST /api/v1/tasks`).
    #[serde(default)]
    pub task: Option<SubmitTask>,
    /// Or the pipeline (the body of `POST /api/v1/pipelines`).
    #[serde(default)]
    pub pipeline: Option<SubmitPipeline>,
}

/// A task as a user submits it (REST body and NATS command payload).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitTask {
    /// Project the task belongs to.
    pub project: String,
    /// Optional human-readable name.
    #[serde(default)]
    pub name: Option<String>,
    /// `https://`, `ssh://` or `file://` URL of the code repository.
    pub code_repo_url: String,
    /// Full hex commit id (40 or 64 characters) of the code.
    pub code_commit_id: String,
    /// URL of the environment repository (may equal the code repository);
    /// absent or empty when `image` names the environment.
    #[serde(default)]
    pub env_repo_url: String,
    /// Full hex commit id of the environment; absent or empty with `image`.
    #[serde(default)]
    pub env_commit_id: String,
    /// Path of the Dockerfile inside the environment repository; absent or
    /// empty with `image`.
    #[serde(default)]
    pub dockerfile_path: String,
    /// An image to run in, pulled from its registry, instead of an
    /// environment built from `env_repo_url`: `registry/name:tag`, best
    /// pinned by digest (`name@sha256:...`).
    #[serde(default)]
    pub image: Option<String>,
    /// Program and its leading arguments, e.g. `["python", "train.py"]`.
    pub command: Vec<String>,
    /// Further arguments appended to `command`.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment variables of the task's process.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub resources: ResourceRequest,
    /// Seconds the run may take (default one day, at most 30 days).
    #[serde(default)]
    pub timeout_seconds: Option<i64>,
    #[serde(default)]
    pub retry: Option<RetryRequest>,
    /// Higher runs first (-1000 to 1000, default 0); equal priorities share
    /// capacity fairly between projects.
    #[serde(default)]
    pub priority: Option<i64>,
    /// The queue to wait in (default `default`): 1-63 of [a-z0-9-_].
    #[serde(default)]
    pub queue: Option<String>,
    /// Project files copied into the workspace before the run (`source`
    /// ending in `/`: every file below that folder).
    #[serde(default)]
    pub inputs: Vec<crate::spec::TaskInput>,
    /// Workspace paths uploaded to the object store after the run (also
    /// after a failure); a directory uploads everything below it.
    #[serde(default)]
    pub outputs: Vec<String>,
    /// `none` (default) or `egress`: a private network to the outside, on
    /// nodes whose owner allows it.
    #[serde(default)]
    pub network: Option<crate::spec::NetworkMode>,
    /// Size of `/dev/shm` in MiB (default: half the memory, at most 16384).
    #[serde(default)]
    pub shm_size_mb: Option<i64>,
    /// Project secrets given to the run as environment variables.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// A workspace folder kept across attempts (retries, lost nodes, reruns).
    #[serde(default)]
    pub checkpoint: Option<CheckpointRequest>,
    /// Seconds a run whose node went offline may stay `disconnected` before
    /// the task is lost and placed anew (0: at once; default: the
    /// platform's, 600 unless set otherwise).
    #[serde(default)]
    pub lost_after_seconds: Option<i64>,
    /// Earlier tasks of the same project this one runs after.
    #[serde(default)]
    pub after: Vec<AfterRequest>,
    /// One of the project's object stores (`GET /api/v1/projects/{p}/stores`)
    /// its files are read from and written to; absent: the project's default.
    #[serde(default)]
    pub store: Option<String>,
    /// Container ports that may be reached through the platform
    /// (`unidesk task port-forward`); the container then joins a network
    /// the node's agent reaches (never the host's).
    #[serde(default)]
    pub ports: Vec<i64>,
    /// Makes the task an interactive session serving a port at an origin
    /// of its own (`POST /api/v1/tasks/{id}/session` gives a link).
    #[serde(default)]
    pub session: Option<SessionRequest>,
}

/// An interactive session (Jupyter, TensorBoard, a web app).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionRequest {
    /// The port the session's origin serves (added to `ports`).
    pub port: i64,
    /// Minutes without traffic after which the session ends (default 60;
    /// fractions allowed; 0: never).
    #[serde(default)]
    pub idle_timeout_minutes: Option<f64>,
}

/// A task to run after: its id, and `success` (the default: it must have
/// succeeded) or `any` (it must have ended).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AfterRequest {
    pub task: String,
    #[serde(default)]
    pub when: Option<String>,
}

/// A workspace folder uploaded while the run goes and at its end, and put
/// back before the next attempt starts.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRequest {
    /// Relative to the workspace.
    pub path: String,
    /// Seconds between uploads while the run goes (default 600).
    #[serde(default)]
    pub every_seconds: Option<i64>,
    /// Start from the checkpoint of this earlier task of the same project
    /// (a rerun does so by itself).
    #[serde(default)]
    pub resume_from: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourceRequest {
    /// CPU cores (fractions allowed), default 1.
    #[serde(default = "one")]
    pub cpus: f64,
    /// Memory in MiB, default 1024.
    #[serde(default = "default_memory")]
    pub memory_mb: i64,
    #[serde(default)]
    pub gpus: i64,
    #[serde(default)]
    pub gpu_model: Option<String>,
    /// Labels a node must carry.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Labels a node should carry: such a node is chosen when it has room.
    #[serde(default)]
    pub preferred_labels: BTreeMap<String, String>,
    /// Free disk (MiB) the task needs on the node, default none.
    #[serde(default)]
    pub disk_mb: i64,
    /// Memory (MiB) each GPU must have, default any.
    #[serde(default)]
    pub gpu_memory_mb: i64,
    /// Lowest CUDA compute capability of each GPU, e.g. `8.0`.
    #[serde(default)]
    pub gpu_compute_capability: Option<String>,
    /// Lowest NVIDIA driver version of the node, e.g. `535.104`.
    #[serde(default)]
    pub gpu_driver: Option<String>,
    /// Share GPUs with other tasks that share theirs (default: GPUs of its own).
    #[serde(default)]
    pub gpu_shared: bool,
}

fn one() -> f64 {
    1.0
}
fn default_memory() -> i64 {
    1024
}

impl Default for ResourceRequest {
    fn default() -> Self {
        Self {
            cpus: 1.0,
            memory_mb: 1024,
            gpus: 0,
            gpu_model: None,
            labels: BTreeMap::new(),
            preferred_labels: BTreeMap::new(),
            disk_mb: 0,
            gpu_memory_mb: 0,
            gpu_compute_capability: None,
            gpu_driver: None,
            gpu_shared: false,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryRequest {
    /// Total attempts including the first (1 = no retry).
    pub max_attempts: i64,
    #[serde(default)]
    pub backoff_seconds: i64,
    /// Retry only runs that exited with one of these codes (default: any failure).
    #[serde(default)]
    pub exit_codes: Vec<i64>,
    /// Retry runs that hit their time limit too (default false).
    #[serde(default)]
    pub on_timeout: bool,
}

/// A pipeline as a user submits it (REST body; `unidesk pipeline submit`
/// reads the same document from YAML).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitPipeline {
    pub project: String,
    #[serde(default)]
    pub name: Option<String>,
    /// Task fields every step has unless it sets them itself (any field of
    /// a task but `project`, `name` and `after`; `env` is merged), e.g. the
    /// repositories and commits.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub defaults: serde_json::Map<String, serde_json::Value>,
    pub steps: Vec<PipelineStepRequest>,
}

/// One step: its place in the graph, and the fields of its task (any field
/// of a task but `project`, `name` and `after`) next to them. An input may name
/// another step's outputs: `step:<name>/<path>` (a step it needs).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct PipelineStepRequest {
    /// 1-63 of a-z, 0-9, `-` and `_`, unique in the pipeline.
    pub name: String,
    /// Steps that must end before this one starts (a matrix step: all of it).
    #[serde(default)]
    pub needs: Vec<String>,
    /// `on_success` (default), `on_failure` or `always`.
    #[serde(default)]
    pub when: Option<crate::spec::StepWhen>,
    /// Parameter name (a-z, 0-9, `_`) to values (1-64 of A-Z, a-z, 0-9, `.`,
    /// `_`, `-`): one step per combination, named `name[v1,v2]`, each with
    /// `{{matrix.NAME}}` replaced in its command, arguments, environment
    /// values and name, and `UD_MATRIX_<NAME>` in its environment.
    #[serde(default)]
    pub matrix: BTreeMap<String, Vec<String>>,
    /// With several needs: `strict` (default; a path two of them changed
    /// differently fails the step, naming the paths) or `last` (the step
    /// needed last wins).
    #[serde(default)]
    pub merge: Option<crate::spec::SharedMerge>,
    /// The task's fields.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub task: serde_json::Map<String, serde_json::Value>,
}

/// One step of a pipeline as it runs (a matrix step: one per combination).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PipelineStepView {
    /// `train`, or `train[0.1,adam]` for one combination of a matrix step.
    pub name: String,
    /// The step as listed in the pipeline.
    pub step: String,
    /// Its matrix values (empty for a plain step).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub values: BTreeMap<String, String>,
    /// Steps it needs (names as here).
    pub needs: Vec<String>,
    pub when: crate::spec::StepWhen,
    /// waiting, running, succeeded, failed, timed_out, cancelled or skipped.
    pub state: String,
    /// Its latest task (see `/api/v1/tasks/{id}` for its log and outputs).
    pub task_id: Option<String>,
    /// Tasks created for it so far (reruns included).
    pub runs: u32,
    /// Why it was skipped.
    pub reason: Option<String>,
}

/// One rejected field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `resources.memory_mb`.
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// A queue's settings as the API stores them in the `ud_queues` bucket
/// (JSON; key: the queue's name).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct QueueRecord {
    pub priority: i32,
    pub max_running: Option<u32>,
    /// How long runs of the queue's tasks stay `disconnected` by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_after_seconds: Option<u64>,
    pub updated_by: String,
    /// Milliseconds since the epoch.
    pub updated_at: i64,
}

/// A project's compute quota as the API stores it in the `ud_quotas`
/// bucket (JSON; key: the project). Each limit absent: no limit.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct QuotaRecord {
    /// Most tasks assigned or running at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tasks: Option<u32>,
    /// Most CPU (in thousandths) its live tasks hold at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cpu_millis: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_gpus: Option<u32>,
    /// GPU-hours its runs may use in a calendar month (UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_hours_per_month: Option<u32>,
    pub updated_by: String,
    /// Milliseconds since the epoch.
    pub updated_at: i64,
}

/// A project webhook as the `ud_webhooks` bucket holds it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct WebhookRecord {
    pub project: String,
    pub name: String,
    /// Where deliveries are POSTed (http or https).
    pub url: String,
    /// Event types delivered (`task.failed`, ...).
    pub events: Vec<String>,
    /// `json` (the event, signed) or `slack` (`{"text": ...}`, signed too).
    pub format: String,
    /// The key of the deliveries' HMAC signature, shown once at creation.
    pub secret: String,
    pub created_by: String,
    /// Milliseconds since the epoch.
    pub created_at: i64,
}

/// One delivery of an event to a webhook, as its log in `UD_WEBHOOK_LOG`
/// keeps it (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
pub struct WebhookDelivery {
    /// The event's id, also the delivery's `UniDesk-Delivery` header.
    pub event_id: String,
    pub event_type: String,
    pub task_id: Option<String>,
    /// `delivered`, or `failed` once every try failed.
    pub outcome: String,
    pub attempts: u32,
    /// The receiver's last HTTP status, if it answered.
    pub status: Option<u16>,
    pub error: Option<String>,
    /// Milliseconds since the epoch, when the delivery ended.
    pub at: i64,
}

/// A project secret as users see it: never its value.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
pub struct SecretInfo {
    /// Also the environment variable a task gets it as.
    pub name: String,
    /// 1 for the first value, one more for each value set after it.
    pub version: u32,
    /// Milliseconds since the epoch.
    pub updated_at: i64,
    /// The token (or admin) that set it last.
    pub updated_by: String,
}

/// Sets a project secret's value.
#[derive(Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetSecret {
    /// 1 byte to 64 KiB of text without NUL.
    pub value: String,
}

/// Never prints the value.
impl std::fmt::Debug for SetSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SetSecret { value: *** }")
    }
}
