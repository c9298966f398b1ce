//! `unidesk-edge`: the compute-node agent, and the leaf configuration of the
//! node's Provider Gateway.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, Result};
use clap::{Args, Parser, Subcommand};
use ud_edge_agent::{run, AgentConfig};
use ud_schemas::edge::{self, NodeToken};
use ud_schemas::spec::NetworkMode;

#[derive(Parser)]
#[command(name = "unidesk-edge", version, about = "UniDesk compute-node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent against the local leaf nats-server.
    Run(Box<RunArgs>),
    /// Print the leaf nats-server configuration for this node.
    LeafConfig(LeafArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Client URL of the local leaf nats-server, with the agent's credentials.
    #[arg(
        long,
        env = "UD_EDGE_LEAF_URL",
        default_value = "nats://127.0.0.1:4223"
    )]
    leaf_url: String,
    /// The node's token (only its node id is used here).
    #[arg(long, env = "UD_NODE_TOKEN", hide_env_values = true)]
    token: String,
    #[arg(long, env = "UD_EDGE_NAME")]
    name: String,
    /// Label KEY=VALUE (repeatable, or comma-separated in the variable).
    #[arg(long = "label", env = "UD_EDGE_LABELS", value_delimiter = ',')]
    labels: Vec<String>,
    #[arg(long, env = "UD_EDGE_HEARTBEAT_SECONDS", default_value_t = 15.0)]
    heartbeat_seconds: f64,
    /// Run every task that names no image of its own in this one instead of
    /// building its environment from the env repository.
    #[arg(long, env = "UD_EDGE_IMAGE")]
    image: Option<String>,
    /// Git cache, build contexts and task workspaces (a path the Docker engine can mount).
    #[arg(
        long,
        env = "UD_EDGE_WORK_DIR",
        default_value = "/var/lib/unidesk-edge"
    )]
    work_dir: std::path::PathBuf,
    /// Longest an environment build may take, in seconds.
    #[arg(long, env = "UD_EDGE_BUILD_TIMEOUT_SECONDS", default_value_t = 1800)]
    build_timeout_seconds: u64,
    /// Below this much free space (MiB) in the work directory the node takes no new tasks.
    #[arg(long, env = "UD_EDGE_MIN_FREE_DISK_MB", default_value_t = 5120)]
    min_free_disk_mb: u64,
    /// Environment images and repository mirrors above this (MiB) are evicted, least recently used first
    /// (only images this agent built; never what a run is preparing or using).
    #[arg(long, env = "UD_EDGE_CACHE_LIMIT_MB", default_value_t = 51200)]
    cache_limit_mb: u64,
    /// Pipeline `/shared` file contents kept on the node above this (MiB) are
    /// evicted, least recently used first (what a step just used is kept).
    #[arg(long, env = "UD_EDGE_SHARED_CACHE_MB", default_value_t = 20480)]
    shared_cache_mb: u64,
    #[arg(long, env = "DOCKER_HOST")]
    docker_host: Option<String>,
    /// `nvidia-smi` to ask when NVML cannot be loaded (a path, or a name on the PATH).
    #[arg(long, env = "UD_EDGE_NVIDIA_SMI", default_value = "nvidia-smi")]
    nvidia_smi: String,
    /// CPUs (fractions allowed) this machine keeps for itself, never offered to tasks.
    #[arg(long, env = "UD_EDGE_RESERVE_CPUS", default_value_t = 0.0)]
    reserve_cpus: f64,
    /// Memory (MiB) this machine keeps for itself, never offered to tasks.
    #[arg(long, env = "UD_EDGE_RESERVE_MEMORY_MB", default_value_t = 0)]
    reserve_memory_mb: u64,
    /// Network modes tasks may ask for besides `none` (`egress`: a private
    /// bridge network to the outside; see docs/nodes.md for the host rule
    /// that keeps it from this machine's own services).
    #[arg(
        long = "allow-network",
        env = "UD_EDGE_ALLOW_NETWORK",
        value_delimiter = ','
    )]
    allow_network: Vec<String>,
    /// The Docker network egress tasks join, and its bridge's name.
    #[arg(long, env = "UD_EDGE_EGRESS_NETWORK", default_value = "unidesk-egress")]
    egress_network: String,
    #[arg(long, env = "UD_EDGE_EGRESS_BRIDGE", default_value = "ud-egress0")]
    egress_bridge: String,
    /// The internal Docker network tasks with ports (sessions) join when
    /// they have no egress: reachable by the agent only.
    #[arg(
        long,
        env = "UD_EDGE_SESSIONS_NETWORK",
        default_value = "unidesk-sessions"
    )]
    sessions_network: String,
    #[command(flatten)]
    kubernetes: KubeArgs,
}

/// Running tasks as Pods of a Kubernetes cluster (docs/kubernetes.md).
#[derive(Args)]
struct KubeArgs {
    /// Run tasks as Pods of a Kubernetes cluster instead of Docker containers
    /// (in the image each task names, or else --image).
    #[arg(long, env = "UD_EDGE_KUBERNETES")]
    kubernetes: bool,
    /// The kubeconfig to use (default: the Pod's service account, or $KUBECONFIG).
    #[arg(long, env = "UD_K8S_KUBECONFIG")]
    kubeconfig: Option<std::path::PathBuf>,
    /// The API server's URL without a kubeconfig (plain HTTP, e.g. `kubectl proxy`).
    #[arg(long, env = "UD_K8S_URL")]
    k8s_url: Option<String>,
    /// The namespace of the Pods.
    #[arg(long, env = "UD_K8S_NAMESPACE", default_value = "unidesk")]
    k8s_namespace: String,
    /// What the cluster offers UniDesk: CPUs (fractions allowed), memory (MiB), GPUs.
    #[arg(long, env = "UD_K8S_CPUS", default_value_t = 0.0)]
    k8s_cpus: f64,
    #[arg(long, env = "UD_K8S_MEMORY_MB", default_value_t = 0)]
    k8s_memory_mb: u64,
    #[arg(long, env = "UD_K8S_GPUS", default_value_t = 0)]
    k8s_gpus: u32,
    /// The model of those GPUs, and their memory (MiB), as tasks ask for them.
    #[arg(long, env = "UD_K8S_GPU_MODEL", default_value = "NVIDIA GPU")]
    k8s_gpu_model: String,
    #[arg(long, env = "UD_K8S_GPU_MEMORY_MB", default_value_t = 0)]
    k8s_gpu_memory_mb: u64,
    /// The image of the init container that checks the code out (git and sh).
    #[arg(long, env = "UD_K8S_GIT_IMAGE", default_value = "alpine/git:2.47.2")]
    k8s_git_image: String,
    /// Node label KEY=VALUE every Pod asks for (repeatable, or comma-separated).
    #[arg(
        long = "k8s-node-selector",
        env = "UD_K8S_NODE_SELECTOR",
        value_delimiter = ','
    )]
    k8s_node_selector: Vec<String>,
    /// PROJECT=NAMESPACE: that project's Pods go to a namespace of its own
    /// (repeatable, or comma-separated); others to --k8s-namespace.
    #[arg(
        long = "k8s-project-namespace",
        env = "UD_K8S_PROJECT_NAMESPACES",
        value_delimiter = ','
    )]
    k8s_project_namespaces: Vec<String>,
    /// The Volcano queue the Pods go to (their scheduler is then Volcano).
    #[arg(long, env = "UD_K8S_VOLCANO_QUEUE")]
    k8s_volcano_queue: Option<String>,
    /// QUEUE=VOLCANO_QUEUE: a UniDesk queue's Pods go to a Volcano queue of
    /// its own (repeatable, or comma-separated).
    #[arg(
        long = "k8s-volcano-queue-of",
        env = "UD_K8S_VOLCANO_QUEUES",
        value_delimiter = ','
    )]
    k8s_volcano_queues: Vec<String>,
    /// A ReadWriteMany PersistentVolumeClaim mounted as the agent's work
    /// directory: tasks with files get their workspace on it (without one
    /// they are refused).
    #[arg(long, env = "UD_K8S_WORKSPACE_CLAIM")]
    k8s_workspace_claim: Option<String>,
}

impl KubeArgs {
    fn settings(self, work_dir: &std::path::Path) -> Result<Option<ud_edge_agent::k8s::Settings>> {
        if !self.kubernetes {
            return Ok(None);
        }
        if !(0.0..=1_000_000.0).contains(&self.k8s_cpus) {
            return Err(anyhow!(
                "UD_K8S_CPUS must be between 0 and 1000000, not {}",
                self.k8s_cpus
            ));
        }
        Ok(Some(ud_edge_agent::k8s::Settings {
            kubeconfig: self.kubeconfig,
            url: self.k8s_url.filter(|u| !u.is_empty()),
            namespace: self.k8s_namespace,
            project_namespaces: key_values(
                "UD_K8S_PROJECT_NAMESPACES",
                &self.k8s_project_namespaces,
            )?,
            cpu_millis: (self.k8s_cpus * 1000.0).round() as u32,
            memory_mb: self.k8s_memory_mb,
            gpus: self.k8s_gpus,
            gpu_model: self.k8s_gpu_model,
            gpu_memory_mb: self.k8s_gpu_memory_mb,
            git_image: self.k8s_git_image,
            node_selector: key_values("UD_K8S_NODE_SELECTOR", &self.k8s_node_selector)?,
            volcano_queue: self.k8s_volcano_queue.filter(|q| !q.is_empty()),
            volcano_queues: key_values("UD_K8S_VOLCANO_QUEUES", &self.k8s_volcano_queues)?,
            workspace_claim: self
                .k8s_workspace_claim
                .filter(|c| !c.is_empty())
                .map(|name| ud_edge_agent::k8s::WorkspaceClaim {
                    name,
                    mounted_at: work_dir.to_owned(),
                }),
        }))
    }
}

/// `KEY=VALUE` items, refused with the setting's name when one is not.
fn key_values(setting: &str, items: &[String]) -> Result<BTreeMap<String, String>> {
    items
        .iter()
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| anyhow!("{setting}: {l:?} is not KEY=VALUE"))
        })
        .collect()
}

#[derive(Args)]
struct LeafArgs {
    #[arg(long, env = "UD_NODE_TOKEN", hide_env_values = true)]
    token: String,
    /// The hub, outbound from the node: `tls://host:port` (or `host:port`),
    /// TLS on the hub's leaf-node port; `wss://host[:port]`, a WebSocket
    /// through the hub's HTTPS entry; `nats-leaf://host:port`, unencrypted,
    /// only with --allow-plain-link.
    #[arg(long, env = "UD_HUB_LEAF_ADDR")]
    hub: String,
    /// The certificate authority the hub's certificate must chain to (a PEM
    /// file the leaf server reads); without it, the system's roots.
    #[arg(long, env = "UD_HUB_CA_FILE")]
    hub_ca: Option<String>,
    /// Accept a `nats-leaf://` hub: node secrets, task environments and
    /// URLs would cross the network in clear. For loopback tests.
    #[arg(long, env = "UD_EDGE_ALLOW_PLAIN_LINK")]
    allow_plain_link: bool,
    #[arg(long, env = "UD_EDGE_STORE_DIR", default_value = "/data/jetstream")]
    store_dir: String,
    /// Client port for the agent.
    #[arg(long, env = "UD_EDGE_LEAF_PORT", default_value_t = 4223)]
    port: u16,
    /// Address the client port listens on (loopback unless the agent runs in another container).
    #[arg(long, env = "UD_EDGE_LEAF_HOST", default_value = "127.0.0.1")]
    listen_host: String,
    #[arg(long, env = "UD_EDGE_AGENT_PASSWORD", hide_env_values = true)]
    agent_password: String,
}

fn token(s: &str) -> Result<NodeToken> {
    NodeToken::parse(s).map_err(|e| anyhow!(e))
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("UD_LOG")
                .unwrap_or_else(|_| "info,async_nats=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::LeafConfig(a) => {
            let t = token(&a.token)?;
            let hub: edge::HubLink = a.hub.parse().map_err(|e| anyhow!("--hub: {e}"))?;
            if hub.is_plain() && !a.allow_plain_link {
                return Err(anyhow!(
                    "--hub {}: a plain link carries the node's secret in clear; use tls:// or wss://, or --allow-plain-link for a loopback test",
                    a.hub
                ));
            }
            let hub_ca = a.hub_ca.filter(|c| !c.is_empty());
            if let Some(ca) = &hub_ca {
                std::fs::metadata(ca).map_err(|e| anyhow!("--hub-ca {ca}: {e}"))?;
            }
            print!(
                "{}",
                edge::leaf_config(
                    &t,
                    &edge::LeafSettings {
                        hub: &hub,
                        hub_ca_file: hub_ca.as_deref(),
                        store_dir: &a.store_dir,
                        client_host: &a.listen_host,
                        client_port: a.port,
                        agent_password: &a.agent_password,
                    }
                )
            );
            Ok(())
        }
        Command::Run(a) => {
            let t = token(&a.token)?;
            let labels = key_values("UD_EDGE_LABELS", &a.labels)?;
            if !(0.001..=86_400.0).contains(&a.heartbeat_seconds) {
                return Err(anyhow!(
                    "UD_EDGE_HEARTBEAT_SECONDS must be between 0.001 and 86400, not {}",
                    a.heartbeat_seconds
                ));
            }
            if !(0.0..=4096.0).contains(&a.reserve_cpus) {
                return Err(anyhow!(
                    "UD_EDGE_RESERVE_CPUS must be between 0 and 4096, not {}",
                    a.reserve_cpus
                ));
            }
            let networks = a
                .allow_network
                .iter()
                .filter(|n| !n.is_empty())
                .map(|n| match n.as_str() {
                    "none" => Ok(NetworkMode::None),
                    "egress" => Ok(NetworkMode::Egress),
                    other => Err(anyhow!(
                        "UD_EDGE_ALLOW_NETWORK: {other:?} is not none or egress"
                    )),
                })
                .collect::<Result<Vec<_>>>()?;
            let image = a.image.filter(|i| !i.is_empty());
            let kubernetes = a.kubernetes.settings(&a.work_dir)?;
            run(AgentConfig {
                leaf_url: a.leaf_url,
                node_id: t.node_id,
                name: a.name,
                labels,
                heartbeat_interval: Duration::from_secs_f64(a.heartbeat_seconds),
                image,
                work_dir: a.work_dir,
                build_timeout: Duration::from_secs(a.build_timeout_seconds),
                min_free_disk_mb: a.min_free_disk_mb,
                cache_limit_mb: a.cache_limit_mb,
                shared_cache_mb: a.shared_cache_mb,
                docker_host: a.docker_host,
                nvidia_smi: a.nvidia_smi,
                offer: ud_edge_agent::info::Offer {
                    reserve_cpu_millis: (a.reserve_cpus * 1000.0).round() as u32,
                    reserve_memory_mb: a.reserve_memory_mb,
                    networks,
                },
                egress_network: a.egress_network,
                egress_bridge: a.egress_bridge,
                sessions_network: a.sessions_network,
                kubernetes,
            })
            .await?;
            Ok(())
        }
    }
}
