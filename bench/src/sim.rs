//! Simulated compute nodes speaking the real protocol over real links: each
//! has its own leaf nats-server (its own JetStream domain and credentials),
//! pulls its dispatches as `unidesk-edge` does and reports through its own
//! stream, but answers a run at once instead of running a container.

use std::time::Duration;

use anyhow::{anyhow, Result};
use futures::StreamExt;
use ud_schemas::dispatch::{self, DispatchRun};
use ud_schemas::edge::{self, NodeToken};
use ud_schemas::events::{NodeRegistered, TaskStarted, TaskSucceeded};
use ud_schemas::report::{Report, RunReport};
use ud_schemas::spec::NodeResources;
use ud_schemas::{now_millis, NodeId};
use ud_testkit::{NatsOptions, NatsServer};

/// A simulated node: its leaf server, its agent and its heartbeats, all
/// stopped when it is dropped.
pub(crate) struct SimNode {
    _leaf: NatsServer,
    agent: tokio::task::JoinHandle<()>,
    beats: tokio::task::JoinHandle<()>,
}

impl SimNode {
    /// The node goes silent (its agent and heartbeats stop; its link stays).
    pub(crate) fn silence(&self) {
        self.beats.abort();
        self.agent.abort();
    }
}

impl Drop for SimNode {
    fn drop(&mut self) {
        self.silence();
    }
}

/// A simulated agent: registers with room for many tasks, beats every
/// second, and answers each dispatch with `started`, then (with `finish`)
/// `succeeded` at once.
async fn sim_agent(
    leaf_url: String,
    node: NodeId,
    name: String,
    finish: bool,
    beats_to: tokio::sync::oneshot::Sender<ud_edge_agent::Reporter>,
) -> Result<()> {
    let connect = |inbox: String| {
        async_nats::ConnectOptions::with_user_and_password("agent".into(), "agent-pw".into())
            .custom_inbox_prefix(inbox)
            .connect(leaf_url.clone())
    };
    // As the agent does: its own stream through a connection of its own.
    let client = connect(edge::inbox_prefix(&node)).await?;
    let local = async_nats::jetstream::with_domain(
        connect(edge::local_inbox_prefix(&node)).await?,
        edge::domain(&node),
    );
    let hub = async_nats::jetstream::with_domain(client.clone(), edge::HUB_DOMAIN);
    ud_edge_agent::ensure_local(&local, &node)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    // As the agent does: forwards the node's reports to the hub; ends
    // with the simulated agent.
    let _forward = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
        ud_edge_agent::forward::keep(local.clone(), client.clone(), node),
    ));
    let reporter = ud_edge_agent::Reporter::new(node, local);
    reporter
        .send(Report::Registered(NodeRegistered {
            at: now_millis(),
            name,
            labels: Default::default(),
            resources: NodeResources {
                cpu_millis: 100_000_000,
                memory_mb: 1 << 40,
                disk_mb: 1 << 30,
                os: "linux".into(),
                agent_version: "sim".into(),
                ..Default::default()
            },
        }))
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let _ = beats_to.send(reporter.clone());
    loop {
        // The hub makes the node's consumer shortly after enrolment: retry until it is there.
        let consumer: async_nats::jetstream::consumer::PullConsumer = match hub
            .get_consumer_from_stream(edge::dispatch_consumer(&node), edge::DISPATCH)
            .await
        {
            Ok(c) => c,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let Ok(mut messages) = consumer.messages().await else {
            continue;
        };
        let mut inflight = tokio::task::JoinSet::new();
        while let Some(m) = messages.next().await {
            let Ok(m) = m else { break };
            if !m.subject.ends_with(".run") {
                let _ = m.ack().await;
                continue;
            }
            let Ok(run) = dispatch::from_cbor::<DispatchRun>(&m.payload, "dispatch-run") else {
                let _ = m.ack().await;
                continue;
            };
            let reporter = reporter.clone();
            inflight.spawn(async move {
                let started = RunReport::Started(TaskStarted {
                    at: now_millis(),
                    node_id: node,
                    attempt: run.attempt,
                });
                let done = RunReport::Succeeded(TaskSucceeded {
                    at: now_millis(),
                    exit_code: 0,
                });
                if reporter.run(run.task_id, started).await.is_ok() && finish {
                    let _ = reporter.run(run.task_id, done).await;
                }
                let _ = m.ack().await;
            });
            while inflight.len() > 256 {
                inflight.join_next().await;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Starts a simulated node's leaf and agent; returns once the hub has its
/// first heartbeat.
/// A node's leaf server linked to the hub on loopback (in clear: benchmarks
/// measure the platform, not TLS).
pub(crate) async fn leaf_server(hub_leaf: u16, token: &NodeToken) -> Result<NatsServer> {
    NatsServer::start_with(NatsOptions {
        sync_always: false,
        domain: edge::domain(&token.node_id),
        extra: edge::leaf_link_config(
            token,
            &edge::HubLink::Plain {
                host: "127.0.0.1".into(),
                port: hub_leaf,
            },
            None,
            "agent-pw",
        ),
        ..Default::default()
    })
    .await
}

pub(crate) async fn join(
    hub_leaf: u16,
    token: &NodeToken,
    name: String,
    store: &ud_core::EventStore,
    finish: bool,
) -> Result<SimNode> {
    let leaf = leaf_server(hub_leaf, token).await?;
    let mut beat = store
        .client()
        .subscribe(format!("ud.node.{}.heartbeat", token.node_id))
        .await?;
    let (url, node) = (format!("nats://127.0.0.1:{}", leaf.port()), token.node_id);
    let (beats_to, reporter) = tokio::sync::oneshot::channel();
    let agent = tokio::spawn(async move {
        if let Err(e) = sim_agent(url, node, name, finish, beats_to).await {
            eprintln!("simulated node {node}: {e}");
        }
    });
    let reporter = reporter
        .await
        .map_err(|_| anyhow!("simulated node {node} did not register"))?;
    let beats = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let _ = reporter.send(crate::restart::sim_heartbeat()).await;
        }
    });
    tokio::time::timeout(Duration::from_secs(60), beat.next())
        .await
        .map_err(|_| anyhow!("node {} never beat", token.node_id))?;
    Ok(SimNode {
        _leaf: leaf,
        agent,
        beats,
    })
}

/// Enrols `n` simulated nodes (`sim-0`, `sim-1`, ...) through the REST API
/// and links each through its own leaf server; they finish tasks at once.
pub(crate) async fn enrol(
    http: &reqwest::Client,
    base: &str,
    admin: &str,
    hub_leaf: u16,
    store: &ud_core::EventStore,
    n: usize,
) -> Result<Vec<SimNode>> {
    let mut sims = Vec::with_capacity(n);
    for i in 0..n {
        let v: serde_json::Value = http
            .post(format!("{base}/api/v1/nodes"))
            .bearer_auth(admin)
            .json(&serde_json::json!({"name": format!("sim-{i}")}))
            .send()
            .await?
            .json()
            .await?;
        let token = NodeToken::parse(v["token"].as_str().unwrap_or_default())
            .map_err(|e| anyhow::anyhow!(e))?;
        sims.push(join(hub_leaf, &token, format!("sim-{i}"), store, true).await?);
    }
    Ok(sims)
}

/// The main server on a hub (or a three-server cluster) with simulated
/// nodes online, an admin token, an HTTP client and the read models.
pub(crate) struct SimPlatform {
    pub hubs: Vec<ud_testkit::NatsServer>,
    pub pg: ud_testkit::PgDatabase,
    pub running: ud_server::Running,
    pub store: ud_core::EventStore,
    pub admin: ud_core::commands::IssuedToken,
    pub http: reqwest::Client,
    /// The API's address, `http://...`.
    pub base: String,
    pub db: tokio_postgres::Client,
    pub sims: Vec<SimNode>,
}

impl SimPlatform {
    pub(crate) async fn start(nodes: usize, sync_always: bool, cluster: bool) -> Result<Self> {
        let timeout = std::time::Duration::from_secs(90);
        let (hubs, pg, running) =
            crate::edge::start_platform_on(timeout, sync_always, cluster).await?;
        let store = running.state.commands.store().clone();
        let admin = crate::edge::admin_token(&running).await?;
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(512)
            .build()?;
        let base = format!("http://{}", running.addr);
        let leaf = hubs[0].leaf_port();
        let sims = enrol(&http, &base, &admin.secret, leaf, &store, nodes).await?;
        let (db, conn) = tokio_postgres::connect(&pg.url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok(Self {
            hubs,
            pg,
            running,
            store,
            admin,
            http,
            base,
            db,
            sims,
        })
    }
}
