//! Where runs execute, behind one interface: containers of a Docker engine
//! ([`crate::docker`]) or Pods of a Kubernetes cluster ([`crate::k8s`]).
//! The agent prepares, starts, follows, stops and adopts runs through
//! [`Runtime`] only; what each engine needs at start (networks, GPU
//! runtimes, namespaces) stays with its implementation.

use std::collections::HashMap;

use futures::future::BoxFuture;
use ud_schemas::dispatch::DispatchRun;
use ud_schemas::{Millis, NodeId, TaskId};

use crate::AgentError;

pub const LABEL_NODE: &str = "io.unidesk.node";
pub const LABEL_TASK: &str = "io.unidesk.task";
pub const LABEL_ATTEMPT: &str = "io.unidesk.attempt";
/// When the container was made (ms since the epoch): its time limit counts from here.
pub const LABEL_STARTED: &str = "io.unidesk.started_at";
/// The same moment on the machine's boot clock ([`crate::boot::stamp`]),
/// which steps of the wall clock do not move.
pub const LABEL_STARTED_BOOT: &str = "io.unidesk.started_boot";
pub const LABEL_TIMEOUT: &str = "io.unidesk.timeout_seconds";
/// The workspace paths uploaded when it ends (a JSON array).
pub const LABEL_OUTPUTS: &str = "io.unidesk.outputs";
/// The task's workspace on the node, mounted at `/workspace`.
pub const LABEL_WORKSPACE: &str = "io.unidesk.workspace";
/// A pipeline step's `/shared` folder on the node.
pub const LABEL_SHARED: &str = "io.unidesk.shared";
/// The GPU devices the run was given (comma-separated UUIDs).
pub const LABEL_GPUS: &str = "io.unidesk.gpus";
/// The task's checkpoint folder and period (JSON `checkpoint`).
pub const LABEL_CHECKPOINT: &str = "io.unidesk.checkpoint";
/// The ports the platform may reach (comma-separated).
pub const LABEL_PORTS: &str = "io.unidesk.ports";
/// A session's idle limit in seconds.
pub const LABEL_IDLE: &str = "io.unidesk.idle_timeout_seconds";
/// Seconds cut off from the main server after which the run stops itself.
pub const LABEL_FENCE: &str = "io.unidesk.fence_after_seconds";

/// A container of this node found after a restart, with what its run needs
/// to be supervised as if the agent had never stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Adopted {
    pub task: TaskId,
    pub attempt: u32,
    pub container: String,
    /// When it was made (ms since the epoch; 0 when its labels do not say).
    pub started_at: Millis,
    /// The same on the boot clock, when its labels say.
    pub started_boot: Option<String>,
    pub timeout_seconds: Option<u64>,
    pub outputs: Vec<String>,
    pub workspace: Option<std::path::PathBuf>,
    /// The GPU devices it was given.
    pub gpus: Vec<String>,
    /// Its checkpoint folder, uploaded while it runs.
    pub checkpoint: Option<ud_schemas::spec::Checkpoint>,
    /// Cut off from the main server this long, it stops itself.
    pub fence_after_seconds: Option<u64>,
    /// Its `/shared` folder, saved when it ends.
    pub shared: Option<std::path::PathBuf>,
    /// Ports the platform may reach.
    pub ports: Vec<u16>,
    /// A session's idle limit.
    pub idle_timeout_seconds: Option<u64>,
}

impl Adopted {
    /// Reads a container's labels; `None` for one that is not a run of `node`.
    pub fn from_labels(
        node: &NodeId,
        id: String,
        labels: &HashMap<String, String>,
    ) -> Option<Self> {
        if labels.get(LABEL_NODE) != Some(&node.to_string()) {
            return None;
        }
        Some(Self {
            task: labels.get(LABEL_TASK)?.parse().ok()?,
            attempt: labels.get(LABEL_ATTEMPT)?.parse().ok()?,
            container: id,
            started_at: labels
                .get(LABEL_STARTED)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            started_boot: labels.get(LABEL_STARTED_BOOT).cloned(),
            timeout_seconds: labels.get(LABEL_TIMEOUT).and_then(|v| v.parse().ok()),
            outputs: labels
                .get(LABEL_OUTPUTS)
                .and_then(|v| serde_json::from_str(v).ok())
                .unwrap_or_default(),
            workspace: labels.get(LABEL_WORKSPACE).map(std::path::PathBuf::from),
            gpus: labels
                .get(LABEL_GPUS)
                .map(|g| g.split(',').map(str::to_owned).collect())
                .unwrap_or_default(),
            checkpoint: labels
                .get(LABEL_CHECKPOINT)
                .and_then(|c| serde_json::from_str(c).ok()),
            fence_after_seconds: labels.get(LABEL_FENCE).and_then(|v| v.parse().ok()),
            shared: labels.get(LABEL_SHARED).map(std::path::PathBuf::from),
            ports: labels
                .get(LABEL_PORTS)
                .map(|p| p.split(',').filter_map(|p| p.parse().ok()).collect())
                .unwrap_or_default(),
            idle_timeout_seconds: labels.get(LABEL_IDLE).and_then(|v| v.parse().ok()),
        })
    }
}

/// What one run's container starts from.
pub struct Launch<'a> {
    pub image: &'a str,
    pub run: &'a DispatchRun,
    /// The task's workspace, mounted at `/workspace`.
    pub workspace: Option<&'a std::path::Path>,
    /// A pipeline step's folder, mounted at `/shared`.
    pub shared: Option<&'a std::path::Path>,
    /// The network `egress` tasks join.
    pub egress_network: &'a str,
    /// The internal network tasks with ports join otherwise.
    pub sessions_network: &'a str,
    /// Environment variables given to this run only (its secrets): never in
    /// the spec, the labels or a log.
    pub secrets: &'a [(String, String)],
}

/// Where each log chunk goes: its stream (`stdout`, `stderr`), its text and
/// the engine's time of it (RFC 3339).
pub type LogSink = Box<
    dyn Fn(&'static str, String, String) -> BoxFuture<'static, Result<(), AgentError>>
        + Send
        + Sync,
>;

/// What the agent does with a run's container, whatever runs it. A handle
/// names one run's container (Docker) or Pod (Kubernetes).
#[async_trait::async_trait]
pub trait Runtime: Send + Sync {
    /// Makes the run's container and starts it; its handle.
    async fn create(&self, launch: &Launch<'_>) -> Result<String, AgentError>;
    /// Starts a container made but not started before a restart: whether it did.
    async fn start_if_created(&self, handle: &str) -> Result<bool, AgentError>;
    /// Waits for the run to end: its exit code.
    async fn wait(&self, handle: &str) -> Result<i32, AgentError>;
    /// When the run ended (ms since the epoch), once it has.
    async fn finished_at(&self, handle: &str) -> Option<Millis>;
    /// The graceful signal, then a kill after `grace` seconds.
    async fn stop(&self, handle: &str, grace: u32) -> Result<(), AgentError>;
    /// Removes what is left of the run.
    async fn remove(&self, handle: &str) -> Result<(), AgentError>;
    /// Hands each log chunk after `after` (the time of the last one sent
    /// before a restart) to `sink` until the run ends.
    async fn follow_logs(&self, handle: &str, after: Option<&str>, sink: LogSink);
    /// This node's runs found at start, to adopt.
    async fn ours(&self) -> Result<Vec<Adopted>, AgentError>;
    /// The run's address, for tunnels to its ports.
    async fn address(&self, handle: &str) -> Option<std::net::IpAddr>;
    /// The id of an image as the engine knows it (empty when unknown).
    async fn image_id(&self, image: &str) -> String;
    /// What runs the node's tasks, and its version (for the node's resources).
    async fn version(&self) -> Option<String>;
}

/// The labels a run's container carries: whose run it is, and what a
/// restarted agent needs to go on supervising it.
pub fn labels(
    node: &NodeId,
    run: &DispatchRun,
    workspace: Option<&std::path::Path>,
    started_at: Millis,
) -> HashMap<String, String> {
    let mut labels = HashMap::from([
        (LABEL_NODE.to_owned(), node.to_string()),
        (LABEL_TASK.to_owned(), run.task_id.to_string()),
        (LABEL_ATTEMPT.to_owned(), run.attempt.to_string()),
        (LABEL_STARTED.to_owned(), started_at.to_string()),
        (
            LABEL_TIMEOUT.to_owned(),
            run.spec.timeout_seconds.to_string(),
        ),
    ]);
    if !run.spec.outputs.is_empty() {
        if let Ok(outputs) = serde_json::to_string(&run.spec.outputs) {
            labels.insert(LABEL_OUTPUTS.to_owned(), outputs);
        }
    }
    if let Some(w) = workspace {
        labels.insert(LABEL_WORKSPACE.to_owned(), w.display().to_string());
    }
    if !run.gpus.is_empty() {
        labels.insert(LABEL_GPUS.to_owned(), run.gpus.join(","));
    }
    if let Some(c) = &run.spec.checkpoint {
        if let Ok(c) = serde_json::to_string(c) {
            labels.insert(LABEL_CHECKPOINT.to_owned(), c);
        }
    }
    if let Some(f) = run.fence_after_seconds {
        labels.insert(LABEL_FENCE.to_owned(), f.to_string());
    }
    if !run.spec.ports.is_empty() {
        let ports: Vec<String> = run.spec.ports.iter().map(u16::to_string).collect();
        labels.insert(LABEL_PORTS.to_owned(), ports.join(","));
    }
    if let Some(s) = &run.spec.session {
        labels.insert(LABEL_IDLE.to_owned(), s.idle_timeout_seconds.to_string());
    }
    labels
}
