//! `ud-bench restart`: a hub restart with many enrolled nodes linked to it.
//!
//! Every node's link is a real leaf-node connection with that node's own
//! credentials and allow-lists. To fit one small machine, one simulator
//! nats-server carries all the links (one remote and one local account per
//! node) instead of one leaf server per node, so the figure is about links:
//! the time until every node's link is back after the hub restarts, and the
//! peak rate at which the hub took them back. (A node is online again with its
//! next heartbeat over that link; heartbeat ingest is measured by `edge`.)

use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use ud_gateway::server::{self, EdgeConfig, ServerConfig};
use ud_schemas::edge::NodeToken;
use ud_testkit::{NatsOptions, NatsServer, PgDatabase};

use crate::stats::line;

#[derive(clap::Args)]
pub struct Args {
    /// Enrolled nodes, each with its own leaf link.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
}

/// One remote and one local account per node.
fn simulator_config(tokens: &[NodeToken], hub_leaf_port: u16) -> String {
    let mut accounts = String::from("accounts {\n");
    let mut remotes = String::from("leafnodes {\n  reconnect: \"1s\"\n  remotes: [\n");
    for (i, t) in tokens.iter().enumerate() {
        accounts.push_str(&format!("  N{i} {{ users: [ {{ user: \"n{i}\", password: \"x\" }} ] }}\n"));
        remotes.push_str(&format!("    {{ urls: [\"nats-leaf://{}:{}@127.0.0.1:{hub_leaf_port}\"], account: N{i} }}\n", t.node_id, t.secret));
    }
    accounts.push_str("}\n");
    remotes.push_str("  ]\n}\n");
    format!("{accounts}{remotes}")
}

async fn leaf_links(http: &reqwest::Client, monitor: &str) -> Option<u64> {
    let v: serde_json::Value = http.get(format!("{monitor}/varz")).send().await.ok()?.json().await.ok()?;
    v["leafnodes"].as_u64()
}

/// Samples the hub's leaf-link count until it reaches `n`: (time taken, peak links gained in one second).
async fn until_linked(http: &reqwest::Client, monitor: &str, n: u64, limit: Duration) -> Result<(Duration, u64)> {
    let t0 = Instant::now();
    let mut samples: Vec<(Duration, u64)> = Vec::new();
    loop {
        let count = leaf_links(http, monitor).await.unwrap_or(0);
        samples.push((t0.elapsed(), count));
        if count >= n {
            break;
        }
        if t0.elapsed() > limit {
            return Err(anyhow!("only {count} of {n} links after {} s", limit.as_secs()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = t0.elapsed();
    let mut peak = 0;
    for (i, (t, c)) in samples.iter().enumerate() {
        let before = samples[..i].iter().rev().find(|(u, _)| *t - *u >= Duration::from_secs(1)).map_or(0, |(_, c)| *c);
        peak = peak.max(c.saturating_sub(before));
    }
    Ok((took, peak))
}

pub async fn run(a: Args) -> Result<()> {
    println!("UniDesk hub-restart benchmark: {} nodes, each with its own leaf link and credentials", a.nodes);
    let (platform_pw, system_pw) = ("bench-platform", "bench-system");
    let accounts = ud_core::edge::hubconf::accounts_with_system(
        "platform",
        &bcrypt::hash(platform_pw, 4)?,
        &[],
        Some(&ud_core::edge::hubconf::SystemUser { user: "sys".into(), password_hash: bcrypt::hash(system_pw, 4)? }),
    );
    let mut hub = NatsServer::start_with(NatsOptions { hub: true, accounts: Some(accounts), ..Default::default() }).await?;
    let pg = PgDatabase::create().await?;
    let running = server::start(ServerConfig {
        nats_url: format!("nats://platform:{platform_pw}@127.0.0.1:{}", hub.port()),
        js_domain: None,
        database_url: pg.url.clone(),
        listen: "127.0.0.1:0".into(),
        replicas: 1,
        run_projectors: true,
        edge: Some(EdgeConfig {
            hub: Some(ud_core::edge::hub::HubSettings {
                accounts_file: hub.accounts_file(),
                pid_file: Some(hub.pid_file()),
                platform_user: "platform".into(),
                platform_password: platform_pw.into(),
                system_user: Some(("sys".into(), system_pw.into())),
                hub_addr: format!("127.0.0.1:{}", hub.port()),
                replicas: 1,
            }),
            controller: ud_core::edge::scheduler::ControllerSettings {
                heartbeat_timeout: Duration::from_secs(90),
                check_interval: Duration::from_secs(1),
                cancel_grace_seconds: 10,
            },
            git_credentials: Default::default(),
        }),
    })
    .await?;
    let store = running.state.commands.store().clone();
    let t = Instant::now();
    let mut tokens = Vec::with_capacity(a.nodes);
    for i in 0..a.nodes {
        let (token, _) = ud_core::edge::enroll::enroll(&store, &format!("sim-{i}"), Default::default(), "bench").await?;
        tokens.push(token);
    }
    line("enrolment of all nodes", t.elapsed().as_secs_f64(), "s", None);
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
    line("accounts file holds every node", t.elapsed().as_secs_f64(), "s", None);
    let http = reqwest::Client::new();
    let monitor = hub.monitor_url();
    let _simulator = NatsServer::start_with(NatsOptions { sync_always: false, domain: "sim".into(), extra: simulator_config(&tokens, hub.leaf_port()), ..Default::default() }).await?;
    let (joined, peak) = until_linked(&http, &monitor, a.nodes as u64, Duration::from_secs(180)).await?;
    line("first join: every link up", joined.as_secs_f64(), "s", None);
    line("first join: peak links accepted in one second", peak as f64, "links/s", None);

    hub.restart().await?;
    let (back, peak) = until_linked(&http, &monitor, a.nodes as u64, Duration::from_secs(180)).await?;
    line("after a hub restart: every link back (target < 60 s)", back.as_secs_f64(), "s", None);
    line("after a hub restart: peak links accepted in one second", peak as f64, "links/s", None);
    running.shutdown();
    Ok(())
}
