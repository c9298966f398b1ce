//! The compute-node agent. It talks only to its local leaf nats-server:
//! reports go into the node's own stream (kept while the uplink is down, then
//! forwarded to the hub), dispatches are pulled from the hub through the leaf.
//!
//! * [`reporter`]: what the node reports; [`forward`]: how it reaches the hub;
//! * `dispatch`: the runs and cancels the hub sends;
//! * `run`: one run, from its preparation to its outcome;
//! * [`runtime`]: where runs execute, [`docker`] containers or [`k8s`] Pods;
//! * [`env`], [`transfer`]: versions, task files;
//! * [`requests`]: what the agent asks the main server.

pub mod boot;
pub mod docker;
pub mod env;
pub mod forward;
pub mod gpus;
pub mod info;
pub mod k8s;
pub mod reporter;
pub mod requests;
pub mod runtime;
pub mod shared;
pub mod transfer;

mod tunnel;

mod dispatch;
mod run;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use tokio::sync::{oneshot, Mutex};
use tracing::{info, warn};
use ud_schemas::dispatch::DispatchCancel;
use ud_schemas::events::{NodeHeartbeat, NodeRegistered};
use ud_schemas::report::Report;
use ud_schemas::{edge, now_millis, NodeId, TaskId};

pub use reporter::Reporter;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("nats: {0}")]
    Nats(#[source] async_nats::Error),
    #[error("the leaf URL: {0}")]
    LeafUrl(#[source] std::io::Error),
    #[error("docker: {0}")]
    Docker(#[from] bollard::errors::Error),
    #[error("container {0} ended without an exit status")]
    NoExitStatus(String),
    #[error("kubernetes: {0}")]
    Kube(#[from] ::kube::Error),
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Codec(#[from] ud_schemas::CodecError),
}

pub(crate) fn nats(e: impl Into<async_nats::Error>) -> AgentError {
    AgentError::Nats(e.into())
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Client URL of the local leaf server, with the agent's credentials.
    pub leaf_url: String,
    pub node_id: NodeId,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub heartbeat_interval: Duration,
    /// Run every task in this image instead of building its environment
    /// from the env repository (nodes without access to repositories).
    pub image: Option<String>,
    /// Git cache, build contexts and task workspaces.
    pub work_dir: std::path::PathBuf,
    /// Longest an environment build may take.
    pub build_timeout: Duration,
    /// Below this much free space in `work_dir` the node says so and takes no new tasks.
    pub min_free_disk_mb: u64,
    /// Environment images and repository mirrors above this are evicted, least recently used first.
    pub cache_limit_mb: u64,
    /// Docker socket (default: the local engine).
    pub docker_host: Option<String>,
    /// `nvidia-smi` to ask when NVML cannot be loaded (a path, or a name on the PATH).
    pub nvidia_smi: String,
    /// What the node keeps for itself and lets tasks do.
    pub offer: info::Offer,
    /// The Docker network `egress` tasks join, and its bridge's name.
    pub egress_network: String,
    pub egress_bridge: String,
    /// The internal Docker network tasks with ports (sessions) join when
    /// they have no egress: the agent reaches them, nothing else does.
    pub sessions_network: String,
    /// Pipeline `/shared` contents kept on the node above this (MiB) are
    /// evicted, least recently used first.
    pub shared_cache_mb: u64,
    /// Runs tasks as Pods of this Kubernetes cluster instead of Docker
    /// containers.
    pub kubernetes: Option<k8s::Settings>,
}

impl AgentConfig {
    /// Settings for a node with everything else as `unidesk-edge run`
    /// defaults it (tests and benchmarks).
    pub fn new(leaf_url: String, node_id: NodeId, name: String) -> Self {
        Self {
            leaf_url,
            node_id,
            name,
            labels: BTreeMap::new(),
            heartbeat_interval: Duration::from_secs(15),
            image: None,
            work_dir: std::env::temp_dir().join(format!("ud-edge-{node_id}")),
            build_timeout: Duration::from_secs(1800),
            min_free_disk_mb: 5120,
            cache_limit_mb: 51200,
            docker_host: None,
            nvidia_smi: "nvidia-smi".into(),
            offer: info::Offer::default(),
            egress_network: "unidesk-egress".into(),
            egress_bridge: "ud-egress0".into(),
            sessions_network: "unidesk-sessions".into(),
            shared_cache_mb: 20480,
            kubernetes: None,
        }
    }
}

/// Exponential backoff with full jitter, capped at 30 s.
pub fn reconnect_delay(attempt: usize) -> Duration {
    let cap = 30_000u64;
    let exp = 100u64.saturating_mul(1u64 << attempt.min(16)).min(cap);
    Duration::from_millis(rand::random::<u64>() % (exp + 1))
}

/// Creates the node's own stream and the consumer its reports are forwarded through.
pub async fn ensure_local(local: &jetstream::Context, node: &NodeId) -> Result<(), AgentError> {
    local
        .get_or_create_stream(stream::Config {
            name: edge::stream(node),
            subjects: vec![edge::stream_subjects(node)],
            storage: stream::StorageType::File,
            max_age: Duration::from_secs(7 * 24 * 3600),
            ..Default::default()
        })
        .await
        .map_err(nats)?;
    let s = local.get_stream(edge::stream(node)).await.map_err(nats)?;
    forward::ensure_consumer(&s).await
}

/// The runs this node has, each with its attempt and where its cancel goes.
pub(crate) type Running = Arc<Mutex<HashMap<TaskId, (u32, oneshot::Sender<DispatchCancel>)>>>;

/// What every part of the agent shares: cloning it costs reference counts.
#[derive(Clone)]
pub(crate) struct Agent {
    pub cfg: Arc<AgentConfig>,
    /// Where runs execute.
    pub runtime: Arc<dyn runtime::Runtime>,
    /// The Docker engine, on a node whose runs are containers: environment
    /// builds and `exec` need it.
    pub docker: Option<docker::Executor>,
    /// Environment images built from env repositories (Docker nodes only).
    pub versions: Option<env::Versions>,
    pub reporter: Reporter,
    pub running: Running,
    pub requests: requests::Requests,
    pub transfers: transfer::Transfers,
    /// Pipeline `/shared` contents kept on this node.
    pub shared: shared::Cache,
    /// The GPUs as last found (none when Docker cannot give them).
    pub gpus: Arc<std::sync::Mutex<gpus::Detected>>,
    /// Running tasks as tunnels reach them.
    pub reachable: tunnel::Reachable,
}

/// The node's GPUs, as containers can have them: none, saying why, when
/// Docker cannot give GPUs to containers.
async fn usable_gpus(cfg: &AgentConfig, docker: &docker::Executor) -> gpus::Detected {
    let smi = cfg.nvidia_smi.clone();
    let found = tokio::task::spawn_blocking(move || gpus::detect(&smi))
        .await
        .unwrap_or_default();
    if let Some(problem) = &found.problem {
        warn!(problem = %problem, "the NVIDIA driver did not answer; this node offers no GPU");
    }
    if found.gpus.is_empty() {
        return found;
    }
    if !docker.gives_gpus().await {
        tracing::error!(
            gpus = found.gpus.len(),
            "GPUs found, but Docker cannot give them to containers: install the NVIDIA Container Toolkit (docs/gpus.md); this node offers no GPU until then"
        );
        return gpus::Detected {
            gpus: Vec::new(),
            problem: Some("Docker has no NVIDIA runtime".into()),
            ..found
        };
    }
    info!(gpus = found.gpus.len(), source = found.source, driver = ?found.driver, cuda = ?found.cuda, "GPUs found");
    found
}

/// Runs the agent until the process is stopped.
pub async fn run(cfg: AgentConfig) -> Result<(), AgentError> {
    let node = cfg.node_id;
    let addr: async_nats::ServerAddr = cfg.leaf_url.parse().map_err(AgentError::LeafUrl)?;
    let connect = |name: String, inbox: String| {
        let options = match (addr.username(), addr.password()) {
            (Some(u), Some(p)) => {
                async_nats::ConnectOptions::with_user_and_password(u.to_owned(), p.to_owned())
            }
            _ => async_nats::ConnectOptions::new(),
        };
        options
            .name(name)
            .custom_inbox_prefix(inbox)
            .retry_on_initial_connect()
            .reconnect_delay_callback(reconnect_delay)
            .connect(addr.clone())
    };
    // Answers from the hub come to the node's own inbox prefix; the node's
    // own stream is worked through another connection whose inboxes the hub
    // does not allow, so its leaf server keeps that interest to itself.
    let client = connect(
        format!("unidesk-edge-{}", cfg.name),
        edge::inbox_prefix(&node),
    )
    .await
    .map_err(nats)?;
    let local_client = connect(
        format!("unidesk-edge-{}-local", cfg.name),
        edge::local_inbox_prefix(&node),
    )
    .await
    .map_err(nats)?;
    let local = jetstream::with_domain(local_client, edge::domain(&node));
    let hub = jetstream::with_domain(client.clone(), edge::HUB_DOMAIN);
    ensure_local(&local, &node).await?;
    let requests = requests::Requests {
        client: client.clone(),
        node,
    };
    let (runtime, docker, versions, found, resources) = match &cfg.kubernetes {
        Some(k) => {
            let pods = k8s::Pods::connect(k.clone(), node).await?;
            let found = k.gpus();
            let resources = info::resources(
                runtime::Runtime::version(&pods).await,
                &cfg.offer,
                &found,
                0,
                0,
            );
            let resources = k.capacity(resources);
            let runtime: Arc<dyn runtime::Runtime> = Arc::new(pods);
            (runtime, None, None, found, resources)
        }
        None => {
            let docker = docker::Executor::connect(cfg.docker_host.as_deref(), node).await?;
            let versions = env::Versions::new(
                cfg.work_dir.clone(),
                docker.client(),
                cfg.build_timeout,
                cfg.cache_limit_mb.saturating_mul(1024 * 1024),
            )
            .with_credentials(requests.clone());
            let found = usable_gpus(&cfg, &docker).await;
            if cfg
                .offer
                .networks
                .contains(&ud_schemas::spec::NetworkMode::Egress)
            {
                docker
                    .ensure_egress_network(&cfg.egress_network, &cfg.egress_bridge)
                    .await?;
            }
            docker
                .ensure_sessions_network(&cfg.sessions_network)
                .await?;
            let (cpus, memory_mb) = info::machine();
            let version = runtime::Runtime::version(&docker).await;
            let resources = info::resources(version, &cfg.offer, &found, cpus, memory_mb);
            let runtime: Arc<dyn runtime::Runtime> = Arc::new(docker.clone());
            (runtime, Some(docker), Some(versions), found, resources)
        }
    };
    let local_for_forward = local.clone();
    let agent = Agent {
        reporter: Reporter::new(node, local),
        transfers: transfer::Transfers::new(requests.clone()),
        shared: shared::Cache::new(cfg.work_dir.join("shared-cache"), cfg.shared_cache_mb),
        running: Arc::default(),
        cfg: Arc::new(cfg),
        gpus: Arc::new(std::sync::Mutex::new(found)),
        runtime,
        docker,
        versions,
        requests,
        reachable: tunnel::Reachable::default(),
    };
    // Everything the agent starts ends with it.
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(forward::keep(local_for_forward, client.clone(), node));

    agent
        .reporter
        .send(Report::Registered(NodeRegistered {
            at: now_millis(),
            name: agent.cfg.name.clone(),
            labels: agent.cfg.labels.clone(),
            resources,
        }))
        .await?;
    info!(node_id = %node, "registered");

    // Containers from before a restart: adopted, never run twice.
    for adopted in agent.runtime.ours().await? {
        run::adopt(&agent, adopted, &mut tasks).await;
    }
    tasks.spawn(heartbeats(agent.clone()));
    tasks.spawn(serve_tunnels(client.clone(), agent.clone()));
    loop {
        // Bind again after any failure: leaf links have been seen to lose
        // interest after a reset.
        if let Err(e) = dispatch::pull(&hub, &agent, &mut tasks).await {
            warn!(error = %e, "dispatch consumer lost; binding again");
        }
        tokio::time::sleep(reconnect_delay(3)).await;
    }
}

/// Answers the platform's tunnels (sessions, exec, port forwarding) for as
/// long as the agent runs.
async fn serve_tunnels(client: async_nats::Client, agent: Agent) {
    let resolver = tunnel::Resolver {
        runtime: agent.runtime.clone(),
        docker: agent.docker.clone(),
        reachable: agent.reachable.clone(),
    };
    loop {
        let served = ud_tunnel::serve(
            client.clone(),
            agent.cfg.node_id,
            resolver.clone(),
            ud_tunnel::Settings::default(),
        )
        .await;
        warn!(outcome = ?served.err(), "tunnels stopped; serving again");
        tokio::time::sleep(reconnect_delay(3)).await;
    }
}

/// Reports the node's heartbeat every interval: its runs, its free disk and
/// (on a node with GPUs) the devices it sees now.
async fn heartbeats(agent: Agent) {
    // A cluster's GPUs are its scheduler's, not this machine's to look at.
    let has_gpus =
        agent.cfg.kubernetes.is_none() && agent.gpus.lock().is_ok_and(|g| !g.gpus.is_empty());
    let mut tick = tokio::time::interval(agent.cfg.heartbeat_interval);
    loop {
        tick.tick().await;
        let seen = if has_gpus {
            let smi = agent.cfg.nvidia_smi.clone();
            let now = tokio::task::spawn_blocking(move || gpus::detect(&smi))
                .await
                .unwrap_or_default();
            let ids: Vec<String> = now.gpus.iter().map(|g| g.uuid.clone()).collect();
            if let Ok(mut g) = agent.gpus.lock() {
                g.gpus = now.gpus;
            }
            Some(ids)
        } else {
            None
        };
        let n = u32::try_from(agent.running.lock().await.len()).unwrap_or(u32::MAX);
        let dir = agent.cfg.work_dir.clone();
        let free = tokio::task::spawn_blocking(move || {
            let _ = std::fs::create_dir_all(&dir);
            info::disk_free_mb(&dir)
        })
        .await
        .ok()
        .flatten();
        let beat = Report::Heartbeat(NodeHeartbeat {
            at: now_millis(),
            running_tasks: n,
            disk_free_mb: free,
            low_disk: free.is_some_and(|f| f < agent.cfg.min_free_disk_mb),
            gpus: seen,
        });
        if let Err(e) = agent.reporter.send(beat).await {
            warn!(error = %e, "heartbeat not recorded");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use ud_schemas::spec::{Resources, RetryPolicy};
    use ud_schemas::TaskSpec;

    pub(crate) fn spec() -> TaskSpec {
        TaskSpec {
            name: None,
            code_repo_url: "https://example.org/code.git".into(),
            code_commit_id: "a".repeat(40),
            env_repo_url: "https://example.org/env.git".into(),
            env_commit_id: "b".repeat(40),
            dockerfile_path: "Dockerfile".into(),
            command: vec!["true".into()],
            args: vec![],
            env: BTreeMap::new(),
            resources: Resources {
                cpu_millis: 1000,
                memory_mb: 512,
                gpus: 0,
                gpu_model: None,
                labels: BTreeMap::new(),
                preferred_labels: BTreeMap::new(),
                disk_mb: 0,
                gpu_memory_mb: 0,
                gpu_compute_capability: None,
                gpu_driver: None,
                gpu_shared: false,
                network: Default::default(),
                preferred_nodes: Vec::new(),
            },
            timeout_seconds: 60,
            retry: RetryPolicy {
                max_attempts: 1,
                backoff_seconds: 0,
                exit_codes: vec![],
                on_timeout: false,
            },
            priority: 0,
            queue: "default".into(),
            inputs: vec![],
            outputs: vec![],
            shm_size_mb: None,
            secrets: vec![],
            checkpoint: None,
            lost_after_seconds: None,
            after: vec![],
            shared: None,
            store: None,
            ports: vec![],
            session: None,
            image: None,
        }
    }
}
