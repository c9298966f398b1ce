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
    Run(RunArgs),
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
    /// Run every task in this image instead of building its environment from the env repository.
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
            let labels: BTreeMap<String, String> = a
                .labels
                .iter()
                .filter(|l| !l.is_empty())
                .map(|l| {
                    l.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .ok_or_else(|| anyhow!("label {l:?} is not KEY=VALUE"))
                })
                .collect::<Result<_>>()?;
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
            run(AgentConfig {
                leaf_url: a.leaf_url,
                node_id: t.node_id,
                name: a.name,
                labels,
                heartbeat_interval: Duration::from_secs_f64(a.heartbeat_seconds),
                image: a.image.filter(|i| !i.is_empty()),
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
            })
            .await?;
            Ok(())
        }
    }
}
