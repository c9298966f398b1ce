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

/// What a node declares about itself when it registers.
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
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Gpu {
    pub model: String,
    pub memory_mb: u64,
}
