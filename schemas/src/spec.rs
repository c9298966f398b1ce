//! What a task asks for and what a node offers, as carried in events.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A validated task definition. Produced only by `ud_core::validate`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TaskSpec {
    pub name: Option<String>,
    pub code_repo_url: String,
    pub code_commit_id: String,
    pub env_repo_url: String,
    pub env_commit_id: String,
    pub dockerfile_path: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub resources: Resources,
    pub timeout_seconds: u64,
    pub retry: RetryPolicy,
    /// Higher first; equal priorities share capacity fairly between projects.
    #[serde(default)]
    pub priority: i32,
    /// The queue it waits in (`default` when absent); queues have their own
    /// priority and concurrency limit.
    #[serde(default = "default_queue")]
    pub queue: String,
    /// Project files copied into the workspace before the run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<TaskInput>,
    /// Workspace paths uploaded to the object store after the run, also after
    /// a failure (a directory uploads everything below it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
    /// Size of `/dev/shm` in MiB (absent: half the memory, at most 16 GiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm_size_mb: Option<u64>,
    /// Project secrets the run gets as environment variables of the same
    /// names; only names are recorded, never values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// A workspace folder kept across attempts: uploaded while the run goes
    /// and at its end, and put back before the next attempt starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
    /// How long a run whose node went offline may stay disconnected before
    /// the task is lost and placed anew; `None`: the platform's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_after_seconds: Option<u64>,
    /// Tasks of the same project this one runs after: it stays pending
    /// until each has ended as its `when` asks, and fails if one cannot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<After>,
    /// A pipeline step's folder at `/shared`: put together before the run
    /// from what the steps it needs left there, saved when it ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared: Option<SharedFolder>,
    /// The project's object store its files are read from and written to
    /// (inputs, outputs, checkpoint, `/shared`, log); `None`: the project's
    /// default store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// TCP ports of the container that may be reached through the platform
    /// (`unidesk task port-forward`, a session): the container then joins
    /// a network the node's agent reaches, never the host's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// An interactive session: its container serves `port` at an origin of
    /// its own; no traffic for `idle_timeout_seconds` ends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<Session>,
    /// An image to run in, pulled from its registry, instead of an
    /// environment built from the env repository (whose fields are then
    /// empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// What makes a task a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Session {
    /// 128 random bits (32 hex digits): the session's host name.
    pub id: String,
    /// The port the session's origin serves (one of the task's `ports`).
    pub port: u16,
    /// No traffic through the session for this long ends it (0: never).
    pub idle_timeout_seconds: u64,
}

/// Whether `id` is a session id: 32 lowercase hex digits.
pub fn session_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The `/shared` folder of a pipeline step's run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SharedFolder {
    /// The tasks whose saved folders it starts from (the latest task of
    /// each step it needs, in order); none: it starts empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<String>)]
    pub from: Vec<crate::TaskId>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub merge: SharedMerge,
}

/// What starting from several folders does with a path that two of them
/// changed differently since they parted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SharedMerge {
    /// The run fails, naming the paths.
    #[default]
    Strict,
    /// The version of the step needed last wins.
    Last,
}

/// A task another one runs after.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub struct After {
    #[schema(value_type = String)]
    pub task: crate::TaskId,
    #[serde(default, skip_serializing_if = "is_default")]
    pub when: AfterWhen,
}

/// How a task must end for the ones after it to run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AfterWhen {
    /// It succeeded (if it ends otherwise, the task after it fails).
    #[default]
    Success,
    /// It ended, however.
    Any,
}

/// One step of a pipeline as submitted: a task spec and where it stands in
/// the graph. Kept as given (a matrix step is one entry); the steps that run
/// are its expansion (`ud_core::pipeline::expand`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PipelineStep {
    /// Unique in the pipeline: 1-63 of a-z, 0-9, `-` and `_`.
    pub name: String,
    /// The task it runs; in a matrix step, `{{matrix.KEY}}` in the command,
    /// arguments, environment values and name stands for the value.
    pub spec: TaskSpec,
    /// Steps that end before this one starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub when: StepWhen,
    /// Parameter name to values: one step per combination of values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub matrix: BTreeMap<String, Vec<String>>,
    /// How `/shared` is put together when it needs several steps.
    #[serde(default, skip_serializing_if = "is_default")]
    pub merge: SharedMerge,
}

/// When a step runs, once every step it needs has ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepWhen {
    /// Every step it needs succeeded (otherwise it is skipped).
    #[default]
    OnSuccess,
    /// A step it needs failed, timed out or was cancelled.
    OnFailure,
    /// However they ended.
    Always,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// What a run's container may reach over the network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    /// No network at all.
    #[default]
    None,
    /// A private bridge network to the outside: never the host's network and
    /// never the host's own services. Only on nodes whose owner allows it.
    Egress,
}

impl NetworkMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Egress => "egress",
        }
    }
}

/// A folder of the workspace kept across attempts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Checkpoint {
    /// Relative to the workspace.
    pub path: String,
    /// Seconds between uploads of what changed while the run goes.
    pub every_seconds: u64,
    /// The task whose checkpoint this one continues (a rerun's first task);
    /// `None`: the task's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub from: Option<crate::TaskId>,
}

impl Checkpoint {
    /// The task whose checkpoint every attempt of `task` reads and writes.
    pub fn owner(&self, task: crate::TaskId) -> crate::TaskId {
        self.from.unwrap_or(task)
    }
}

/// A project file (or every file below a folder, when `source` ends with
/// `/`) copied to `path` in the task's workspace before the run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TaskInput {
    pub source: String,
    pub path: String,
}

/// Where an input comes from: a project file (or folder), a task's
/// outputs (`task:<id>/<path>`; `task:<id>/` for all of them), or in a
/// pipeline a step's outputs (`step:<name>/<path>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputSource<'a> {
    File(&'a str),
    /// `path` is empty for every output; ends with `/` for a folder.
    TaskOutput {
        task: crate::TaskId,
        path: &'a str,
    },
    StepOutput {
        step: &'a str,
        path: &'a str,
    },
}

impl<'a> InputSource<'a> {
    /// Parses and checks `source`: the path part must be relative (see
    /// [`relative_path`]), except that a reference may name all outputs.
    pub fn parse(source: &'a str) -> Result<Self, String> {
        let reference = |rest: &'a str, what: &str| -> Result<(&'a str, &'a str), String> {
            let (name, path) = rest.split_once('/').ok_or_else(|| {
                format!("names no path: write {what}/<path> ({what}/ for all outputs)")
            })?;
            if !path.is_empty() {
                relative_path(path)?;
            }
            Ok((name, path))
        };
        if let Some(rest) = source.strip_prefix("task:") {
            let (task, path) = reference(rest, "task:<id>")?;
            let task = task
                .parse()
                .map_err(|_| format!("names no task id: {task:?}"))?;
            Ok(Self::TaskOutput { task, path })
        } else if let Some(rest) = source.strip_prefix("step:") {
            let (step, path) = reference(rest, "step:<name>")?;
            if step.is_empty() {
                return Err("names no step".into());
            }
            Ok(Self::StepOutput { step, path })
        } else {
            relative_path(source)?;
            Ok(Self::File(source))
        }
    }
}

/// Longest object or workspace path (S3 keys are at most 1,024 bytes; prefixes need room).
pub const MAX_RELATIVE_PATH_BYTES: usize = 900;

/// Checks a relative `/`-separated path (an object path or a place in a
/// workspace): no leading `/`, no empty, `.` or `..` segment, no control
/// characters, so that joined to a prefix it never names anything outside
/// it. Returns the path without a trailing `/`, or why it is refused.
pub fn relative_path(path: &str) -> Result<&str, String> {
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    if trimmed.is_empty() {
        return Err("is empty".into());
    }
    if path.len() > MAX_RELATIVE_PATH_BYTES {
        return Err(format!("is longer than {MAX_RELATIVE_PATH_BYTES} bytes"));
    }
    if trimmed.starts_with('/') {
        return Err("must be relative (no leading '/')".into());
    }
    if trimmed.chars().any(|c| c.is_control() || c == '\\') {
        return Err("contains a control character or a backslash".into());
    }
    if trimmed
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err("has an empty, '.' or '..' segment".into());
    }
    Ok(trimmed)
}

/// A short name (a pipeline step, an object store): 1-63 of a-z, 0-9, `-`
/// and `_`.
pub fn short_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Whether `name` may name an environment variable: letters, digits and
/// `_`, not starting with a digit.
pub fn env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Longest name of a project secret.
pub const MAX_SECRET_NAME_BYTES: usize = 128;

/// A project secret is named as the environment variable a run gets it as.
pub fn secret_name(name: &str) -> Result<&str, &'static str> {
    if env_name(name) && name.len() <= MAX_SECRET_NAME_BYTES {
        Ok(name)
    } else {
        Err("1-128 letters, digits and '_', not starting with a digit")
    }
}

/// A user's name: 1-64 of a-z, 0-9, '.', '_', '@' and '-', starting with a
/// letter or digit (an e-mail address in lower case fits).
pub fn user_name(name: &str) -> Result<&str, &'static str> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'@' | b'-')
        })
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(name)
    } else {
        Err("1-64 of a-z, 0-9, '.', '_', '@' and '-', starting with a letter or digit")
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

pub fn default_queue() -> String {
    "default".into()
}

/// Resources a task requests. CPUs are in thousandths of a core.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub struct Resources {
    pub cpu_millis: u32,
    pub memory_mb: u64,
    pub gpus: u32,
    pub gpu_model: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Labels a node should carry: placed there when such a node has room.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub preferred_labels: BTreeMap<String, String>,
    /// Free disk the task needs on the node (0: no need stated).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub disk_mb: u64,
    /// Memory each GPU must have, in MiB (0: any).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gpu_memory_mb: u64,
    /// Lowest CUDA compute capability each GPU must have (`8.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_compute_capability: Option<String>,
    /// Lowest NVIDIA driver version the node must run (`535.104`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_driver: Option<String>,
    /// The task may share its GPUs with other tasks that share theirs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gpu_shared: bool,
    /// What the run's container may reach (absent: `none`); a node offers
    /// `egress` only where its owner allows it.
    #[serde(default, skip_serializing_if = "is_default")]
    pub network: NetworkMode,
    /// Nodes to place it on when one has room (those holding what it
    /// starts from), before preferred labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<String>)]
    pub preferred_nodes: Vec<crate::NodeId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RetryPolicy {
    /// Total attempts including the first one (1 = never retry).
    pub max_attempts: u32,
    pub backoff_seconds: u32,
    /// Retry only runs that exited with one of these codes (empty: any failure).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exit_codes: Vec<i32>,
    /// Retry runs that hit their time limit too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_timeout: bool,
}

/// What a node declares about itself when it registers: what it offers
/// tasks (its own reserve already taken off).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
pub struct NodeResources {
    pub cpu_millis: u32,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub gpus: Vec<Gpu>,
    pub os: String,
    pub wsl: bool,
    pub docker_version: Option<String>,
    pub agent_version: String,
    /// The NVIDIA driver version (absent without GPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_driver: Option<String>,
    /// The CUDA version the driver supports (`12.2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_version: Option<String>,
    /// Network modes the node's owner allows tasks (absent: `none` only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<NetworkMode>,
}

/// A GPU device a container can be given: a whole GPU, or a MIG instance
/// of a GPU in MIG mode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Gpu {
    pub model: String,
    pub memory_mb: u64,
    /// The GPU's index on the node (a MIG instance's: its parent's).
    #[serde(default)]
    pub index: u32,
    /// `GPU-…`, or `MIG-…` for a MIG instance (absent in older events).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uuid: String,
    /// CUDA compute capability (`8.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_capability: Option<String>,
    /// The MIG profile of an instance (`1g.10gb`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig_profile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_bus_id: Option<String>,
}
