//! `unidesk-edge`: the compute-node agent.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, Result};
use clap::Parser;
use ud_edge_agent::{run, AgentConfig};

#[derive(Parser)]
#[command(name = "unidesk-edge", version, about = "UniDesk compute-node agent")]
struct Args {
    /// Client URL of the local leaf nats-server, with the agent's credentials.
    #[arg(long, env = "UD_EDGE_LEAF_URL", default_value = "nats://127.0.0.1:4223")]
    leaf_url: String,
    /// The node's id (from its enrollment token).
    #[arg(long, env = "UD_EDGE_NODE_ID")]
    node_id: ud_schemas::NodeId,
    #[arg(long, env = "UD_EDGE_NAME")]
    name: String,
    /// Label KEY=VALUE (repeatable).
    #[arg(long = "label", env = "UD_EDGE_LABELS", value_delimiter = ',')]
    labels: Vec<String>,
    #[arg(long, env = "UD_EDGE_HEARTBEAT_SECONDS", default_value_t = 15.0)]
    heartbeat_seconds: f64,
    /// Image tasks run in.
    #[arg(long, env = "UD_EDGE_IMAGE", default_value = "unidesk/busybox:base")]
    image: String,
    #[arg(long, env = "DOCKER_HOST")]
    docker_host: Option<String>,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("UD_LOG").unwrap_or_else(|_| "info,async_nats=warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let labels: BTreeMap<String, String> = a
        .labels
        .iter()
        .filter(|l| !l.is_empty())
        .map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| anyhow!("label {l:?} is not KEY=VALUE")))
        .collect::<Result<_>>()?;
    if !(a.heartbeat_seconds > 0.0 && a.heartbeat_seconds.is_finite()) {
        return Err(anyhow!("heartbeat seconds must be positive"));
    }
    run(AgentConfig {
        leaf_url: a.leaf_url,
        node_id: a.node_id,
        name: a.name,
        labels,
        heartbeat_interval: Duration::from_secs_f64(a.heartbeat_seconds),
        image: a.image,
        docker_host: a.docker_host,
    })
    .await?;
    Ok(())
}
