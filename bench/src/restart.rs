//! `ud-bench restart`: many simulated nodes speaking the real protocol to a
//! real hub and main server: steady heartbeats (rate and the main server's
//! CPU), then a hub restart (time until every node is online again, peak
//! link rate).
//!
//! Every node's link is a real leaf-node connection with that node's own
//! credentials and allow-lists, and every node reports into its own stream
//! and forwards from it to the hub, as a real agent does. To fit one small
//! machine, a few simulator nats-servers carry all the nodes: one remote and
//! one account per node, the account's JetStream also under the node's own
//! domain prefix (`$JS.n<hex>.API`) by a subject mapping, instead of one
//! leaf server per node. A leaf server has one reconnect interval for all its
//! remotes, so with `--reconnect spread` the nodes are grouped by the
//! interval their own leaf servers would have (one simulator per second of
//! it); `--reconnect fixed` puts them all on one at 1 s, for comparison. The simulated agents run in a child process, so the CPU figure is
//! the main server's alone.
//!
//! The hub replaces an accepted leaf link only when a link of the same
//! server, cluster, local account and hub account comes again (nats-server's
//! `addLeafNodeConnection`): each simulated node binds an account of its own
//! on its simulator, so the nodes of one simulator never replace each
//! other; the replacements counted are links that came back while the hub
//! still held the old one, as a real node's can.
//!
//! A simulated agent whose start fails (connect, its own stream, its
//! registration) tries again with backoff, as a supervised real agent is
//! restarted; each failure is printed (`simulated node i: start failed`),
//! so that a node never heard can be told from one that never started.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use futures::StreamExt;
use ud_schemas::edge::{self, NodeToken};
use ud_schemas::events::{NodeHeartbeat, NodeRegistered};
use ud_schemas::report::Report;
use ud_schemas::{now_millis, NodeId};
use ud_testkit::{NatsOptions, NatsServer};

use crate::stats::line;

#[derive(clap::Args)]
pub struct Args {
    /// Enrolled nodes, each with its own leaf link and stream.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Seconds between a node's heartbeats.
    #[arg(long, default_value_t = 15.0)]
    heartbeat_seconds: f64,
    /// Seconds of steady heartbeats measured.
    #[arg(long, default_value_t = 45)]
    measure_seconds: u64,
    /// How the nodes' leaf servers time their reconnects: `spread`, each at
    /// its own interval of 1 to 10 s as `unidesk-edge leaf-config` writes
    /// it (one simulator server per whole second), or `fixed`, every node at
    /// 1 s (as before).
    #[arg(long, default_value = "spread")]
    reconnect: String,
}

/// The simulated agents: run by the benchmark as its own child process.
#[derive(clap::Args)]
pub struct AgentsArgs {
    /// Client port of the simulator nats-server.
    #[arg(long)]
    port: u16,
    /// Node ids, one per line, in account order.
    #[arg(long)]
    nodes_file: std::path::PathBuf,
    #[arg(long)]
    heartbeat_seconds: f64,
}

/// One remote and one local account per node, with JetStream under the node's domain prefix.
fn simulator_config(tokens: &[NodeToken], hub_leaf_port: u16, reconnect_ms: u64) -> String {
    let mut accounts = String::from("accounts {\n");
    let mut remotes = format!("leafnodes {{\n  reconnect: \"{reconnect_ms}ms\"\n  remotes: [\n");
    for (i, t) in tokens.iter().enumerate() {
        accounts.push_str(&format!(
            "  N{i} {{ jetstream: enabled, users: [ {{ user: \"n{i}\", password: \"x\" }} ], mappings: {{ \"$JS.{}.API.>\": \"$JS.API.>\" }} }}\n",
            edge::domain(&t.node_id)
        ));
        remotes.push_str(&format!(
            "    {{ urls: [\"nats-leaf://{}:{}@127.0.0.1:{hub_leaf_port}\"], account: N{i} }}\n",
            t.node_id, t.secret
        ));
    }
    accounts.push_str("}\n");
    remotes.push_str("  ]\n}\n");
    format!("{accounts}{remotes}")
}

async fn leaf_links(http: &reqwest::Client, monitor: &str) -> Option<u64> {
    let v: serde_json::Value = http
        .get(format!("{monitor}/varz"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    v["leafnodes"].as_u64()
}

/// Samples the hub's leaf-link count until it reaches `n`: (time taken, peak links gained in one second).
async fn until_linked(
    http: &reqwest::Client,
    monitor: &str,
    n: u64,
    limit: Duration,
) -> Result<(Duration, u64)> {
    let t0 = Instant::now();
    let mut samples: Vec<(Duration, u64)> = Vec::new();
    loop {
        let count = leaf_links(http, monitor).await.unwrap_or(0);
        samples.push((t0.elapsed(), count));
        if count >= n {
            break;
        }
        if t0.elapsed() > limit {
            return Err(anyhow!(
                "only {count} of {n} links after {} s",
                limit.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = t0.elapsed();
    let mut peak = 0;
    for (i, (t, c)) in samples.iter().enumerate() {
        let before = samples[..i]
            .iter()
            .rev()
            .find(|(u, _)| *t - *u >= Duration::from_secs(1))
            .map_or(0, |(_, c)| *c);
        peak = peak.max(c.saturating_sub(before));
    }
    Ok((took, peak))
}

pub async fn run(a: Args) -> Result<()> {
    println!(
        "UniDesk hub-restart benchmark: {} nodes, each with its own leaf link and credentials",
        a.nodes
    );
    let (mut hub, _pg, running) = crate::edge::start_platform(Duration::from_secs(90)).await?;
    let store = running.state.commands.store().clone();
    let t = Instant::now();
    let mut tokens = Vec::with_capacity(a.nodes);
    for i in 0..a.nodes {
        let (token, _) =
            ud_core::edge::enroll::enroll(&store, &format!("sim-{i}"), Default::default(), "bench")
                .await?;
        tokens.push(token);
    }
    line(
        "enrolment of all nodes",
        t.elapsed().as_secs_f64(),
        "s",
        None,
    );
    // The hub reconciler writes every node user into the hub's accounts file.
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(hub.accounts_file()).unwrap_or_default();
        if text.matches("LEAFNODE").count() >= a.nodes {
            break;
        }
        if t.elapsed() > Duration::from_secs(120) {
            return Err(anyhow!("the accounts file never held every node"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    line(
        "accounts file holds every node",
        t.elapsed().as_secs_f64(),
        "s",
        None,
    );
    let http = reqwest::Client::new();
    let monitor = hub.monitor_url();
    // The nodes by reconnect interval: one simulator server for each.
    let mut groups: std::collections::BTreeMap<u64, Vec<NodeToken>> = Default::default();
    for t in &tokens {
        let ms = match a.reconnect.as_str() {
            "fixed" => 1000,
            "spread" => edge::reconnect_millis(&t.node_id) / 1000 * 1000,
            other => return Err(anyhow!("--reconnect {other:?} is not spread or fixed")),
        };
        groups.entry(ms).or_default().push(t.clone());
    }
    line(
        &format!("reconnect intervals ({}): simulator servers", a.reconnect),
        groups.len() as f64,
        "",
        None,
    );
    let ids: Vec<NodeId> = tokens.iter().map(|t| t.node_id).collect();
    let mut beats = store.client().subscribe("ud.node.*.heartbeat").await?;
    let t = Instant::now();
    let mut simulators = Vec::new();
    let mut agents = Vec::new();
    for (ms, group) in &groups {
        let simulator = NatsServer::start_with(NatsOptions {
            sync_always: false,
            domain: format!("sim{ms}"),
            extra: simulator_config(group, hub.leaf_port(), *ms),
            ..Default::default()
        })
        .await?;
        // The simulated agents, in their own process, start with their nodes' links.
        let nodes_file = simulator.dir().join("nodes.txt");
        std::fs::write(
            &nodes_file,
            group
                .iter()
                .map(|t| format!("{}\n", t.node_id))
                .collect::<String>(),
        )?;
        agents.push(
            tokio::process::Command::new(std::env::current_exe()?)
                .args([
                    "agents",
                    "--port",
                    &simulator.port().to_string(),
                    "--nodes-file",
                ])
                .arg(&nodes_file)
                .args(["--heartbeat-seconds", &a.heartbeat_seconds.to_string()])
                .kill_on_drop(true)
                .spawn()?,
        );
        simulators.push(simulator);
    }
    let (joined, peak) =
        until_linked(&http, &monitor, a.nodes as u64, Duration::from_secs(180)).await?;
    line("first join: every link up", joined.as_secs_f64(), "s", None);
    line(
        "first join: peak links accepted in one second",
        peak as f64,
        "links/s",
        None,
    );
    let limit = Duration::from_secs_f64(a.heartbeat_seconds * 4.0 + 300.0);
    all_heard(&mut beats, &ids, limit).await?;
    line(
        "every node heard (registered, first heartbeat ingested)",
        t.elapsed().as_secs_f64(),
        "s",
        None,
    );

    // Steady heartbeats: what the main server spends on them.
    let cpu0 = crate::edge::cpu_seconds();
    let t = Instant::now();
    let mut n = 0u64;
    let window = Duration::from_secs(a.measure_seconds);
    while let Ok(Some(_)) = tokio::time::timeout_at((t + window).into(), beats.next()).await {
        n += 1;
    }
    let took = t.elapsed().as_secs_f64();
    let cpu = crate::edge::cpu_seconds() - cpu0;
    let offered = a.nodes as f64 / a.heartbeat_seconds;
    line(
        "heartbeats ingested per second (steady)",
        n as f64 / took,
        "hb/s",
        None,
    );
    line("heartbeats offered per second", offered, "hb/s", None);
    line(
        "main-server CPU per heartbeat (steady)",
        cpu / n.max(1) as f64 * 1e6,
        "us",
        None,
    );
    line(
        "main-server share of one core",
        cpu / took * 100.0,
        "%",
        None,
    );
    line(
        "share of one core for 10,000 nodes at 15 s (target < 10%)",
        (10_000.0 / 15.0) * cpu / n.max(1) as f64 * 100.0,
        "%",
        None,
    );

    // A hub restart: every link back, every node heard again.
    hub.restart().await?;
    let t = Instant::now();
    let linked = until_linked(&http, &monitor, a.nodes as u64, Duration::from_secs(180));
    let heard = all_heard(&mut beats, &ids, limit);
    let ((back, peak), ()) = tokio::try_join!(linked, heard)?;
    line(
        "after a hub restart: every link back",
        back.as_secs_f64(),
        "s",
        None,
    );
    line(
        "after a hub restart: peak links accepted in one second",
        peak as f64,
        "links/s",
        None,
    );
    line(
        "after a hub restart: every node heard again (target < 60 s)",
        t.elapsed().as_secs_f64(),
        "s",
        None,
    );
    let log = std::fs::read_to_string(hub.dir().join("nats.log")).unwrap_or_default();
    line(
        "links the hub replaced (a link back before the hub dropped the old one)",
        log.matches("Replacing connection from same server").count() as f64,
        "",
        None,
    );
    line(
        "leaf connections the hub accepted in all",
        log.matches("Leafnode connection created").count() as f64,
        "",
        None,
    );
    running.shutdown();
    Ok(())
}

/// Waits until a heartbeat of every node in `ids` has been ingested.
async fn all_heard(
    beats: &mut async_nats::Subscriber,
    ids: &[NodeId],
    limit: Duration,
) -> Result<()> {
    let mut missing: std::collections::HashSet<String> =
        ids.iter().map(ToString::to_string).collect();
    let deadline = tokio::time::Instant::now() + limit;
    let mut report = tokio::time::Instant::now() + Duration::from_secs(10);
    while !missing.is_empty() {
        if tokio::time::Instant::now() >= report {
            eprintln!(
                "  ... {} of {} nodes heard",
                ids.len() - missing.len(),
                ids.len()
            );
            report += Duration::from_secs(10);
        }
        match tokio::time::timeout_at(deadline, beats.next()).await {
            Ok(Some(m)) => {
                if let Some(id) = m.subject.split('.').nth(2) {
                    missing.remove(id);
                }
            }
            Ok(None) => {
                return Err(anyhow!(
                    "the subscription ended with {} of {} nodes never heard",
                    missing.len(),
                    ids.len()
                ))
            }
            Err(_) => {
                return Err(anyhow!(
                    "{} of {} nodes never heard within {} s",
                    missing.len(),
                    ids.len(),
                    limit.as_secs()
                ))
            }
        }
    }
    Ok(())
}

/// The simulated agents: each connects as its node's user, keeps its own
/// stream, registers, then sends heartbeats until the process is stopped.
pub async fn agents(a: AgentsArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.nodes_file)?;
    let ids: Vec<NodeId> = text.lines().filter_map(|l| l.parse().ok()).collect();
    let interval = Duration::from_secs_f64(a.heartbeat_seconds);
    let count = ids.len().max(1) as f64;
    let mut set = tokio::task::JoinSet::new();
    for (i, node) in ids.into_iter().enumerate() {
        let url = format!("127.0.0.1:{}", a.port);
        // Spread the first heartbeats over one interval.
        let offset = interval.mul_f64(i as f64 / count);
        set.spawn(agent(url, i, node, interval, offset));
    }
    while set.join_next().await.is_some() {}
    Ok(())
}

/// A simulated node's heartbeat: idle, with plenty of disk.
pub fn sim_heartbeat() -> Report {
    Report::Heartbeat(NodeHeartbeat {
        at: now_millis(),
        running_tasks: 0,
        disk_free_mb: Some(1 << 30),
        low_disk: false,
        gpus: None,
    })
}

async fn agent(url: String, i: usize, node: NodeId, interval: Duration, offset: Duration) {
    let mut attempt = 0;
    let (reporter, local, client) = loop {
        match start_agent(&url, i, node).await {
            Ok(started) => break started,
            Err(e) => {
                eprintln!("simulated node {i}: start failed, trying again: {e}");
                tokio::time::sleep(ud_edge_agent::reconnect_delay(attempt)).await;
                attempt += 1;
            }
        }
    };
    // As the agent does: forwards the node's reports to the hub.
    tokio::spawn(ud_edge_agent::forward::keep(local, client, node));
    tokio::time::sleep(offset).await;
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        if let Err(e) = reporter.send(sim_heartbeat()).await {
            eprintln!("simulated node {i}: heartbeat not recorded: {e}");
        }
    }
}

/// Connects as the node's user (as the agent does, its own stream through
/// a connection of its own), makes its own stream and registers it.
async fn start_agent(
    url: &str,
    i: usize,
    node: NodeId,
) -> Result<(
    ud_edge_agent::Reporter,
    async_nats::jetstream::Context,
    async_nats::Client,
)> {
    let connect = |inbox: String| {
        async_nats::ConnectOptions::with_user_and_password(format!("n{i}"), "x".into())
            .custom_inbox_prefix(inbox)
            .connect(url)
    };
    let client = connect(edge::inbox_prefix(&node)).await?;
    let local = async_nats::jetstream::new(connect(edge::local_inbox_prefix(&node)).await?);
    ud_edge_agent::ensure_local(&local, &node)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let reporter = ud_edge_agent::Reporter::new(node, local.clone());
    reporter
        .send(Report::Registered(NodeRegistered {
            at: now_millis(),
            name: format!("sim-{i}"),
            labels: Default::default(),
            resources: ud_schemas::spec::NodeResources::default(),
        }))
        .await
        .map_err(|e| anyhow!("{e}"))?;
    Ok((reporter, local, client))
}
