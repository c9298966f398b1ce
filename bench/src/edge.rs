//! `ud-bench edge`: a real compute node (hub, leaf, agent, Docker) measured:
//! submit-to-container-start latency on a warm node, heartbeats the main
//! server ingests per second (a backlog drained after a link cut) and the
//! CPU it spends on them, and the offline detection delay against its setting.

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use futures::StreamExt;
use serde_json::json;
use ud_schemas::edge::{self, NodeToken};
use ud_schemas::events::NodeHeartbeat;
use ud_schemas::{Event, NodeEvent};
use ud_server::{self as server, EdgeConfig, ServerConfig};
use ud_testkit::{NatsOptions, NatsServer, PgDatabase};

use crate::stats::{line, ms, percentile};

#[derive(clap::Args)]
pub struct Args {
    /// Tasks submitted one after another for the latency figure.
    #[arg(long, default_value_t = 30)]
    tasks: usize,
    /// Heartbeats buffered by the node while its link is down.
    #[arg(long, default_value_t = 20_000)]
    heartbeats: usize,
    /// The offline timeout measured (90 s in production).
    #[arg(long, default_value_t = 90)]
    offline_timeout_seconds: u64,
}

pub fn cpu_seconds() -> f64 {
    // utime + stime of this process, from /proc (clock ticks of 10 ms).
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let after = s.rsplit(')').next()?.split_whitespace().collect::<Vec<_>>();
            let ut: f64 = after.get(11)?.parse().ok()?;
            let st: f64 = after.get(12)?.parse().ok()?;
            Some((ut + st) / 100.0)
        })
        .unwrap_or(0.0)
}

/// A hub with its accounts file, PostgreSQL and the main server managing the
/// hub's node users, with `timeout` as the offline setting.
pub async fn start_platform(
    timeout: Duration,
) -> Result<(NatsServer, PgDatabase, ud_server::Running)> {
    start_platform_with(timeout, true).await
}

/// [`start_platform`], with the hub syncing every write or not.
pub async fn start_platform_with(
    timeout: Duration,
    sync_always: bool,
) -> Result<(NatsServer, PgDatabase, ud_server::Running)> {
    let (mut hubs, pg, running) = start_platform_on(timeout, sync_always, false).await?;
    let hub = hubs.pop().ok_or_else(|| anyhow!("no hub"))?;
    Ok((hub, pg, running))
}

/// [`start_platform_with`], on one hub or on a three-server cluster (streams
/// with three replicas; nodes link to the first member, whose accounts file
/// the main server keeps).
pub async fn start_platform_on(
    timeout: Duration,
    sync_always: bool,
    cluster: bool,
) -> Result<(Vec<NatsServer>, PgDatabase, ud_server::Running)> {
    let platform_pw = "bench-platform";
    let system_pw = "bench-system";
    let accounts = ud_core::edge::hubconf::accounts_with_system(
        "platform",
        &bcrypt::hash(platform_pw, 4)?,
        &[],
        Some(&ud_core::edge::hubconf::SystemUser {
            user: "sys".into(),
            password_hash: bcrypt::hash(system_pw, 4)?,
        }),
    );
    let options = NatsOptions {
        hub: true,
        accounts: Some(accounts),
        sync_always,
        ..Default::default()
    };
    let hubs = if cluster {
        NatsServer::cluster_with(options, Some(("platform", platform_pw))).await?
    } else {
        vec![NatsServer::start_with(options).await?]
    };
    let hub = &hubs[0];
    let replicas = hubs.len();
    let urls: Vec<String> = hubs
        .iter()
        .map(|h| format!("nats://platform:{platform_pw}@127.0.0.1:{}", h.port()))
        .collect();
    let pg = PgDatabase::create().await?;
    let running = server::start(ServerConfig {
        edge: Some(EdgeConfig {
            hub: Some(ud_core::edge::hub::HubSettings {
                accounts_file: hub.accounts_file(),
                pid_file: Some(hub.pid_file()),
                platform_user: "platform".into(),
                platform_password: platform_pw.into(),
                system_user: Some(("sys".into(), system_pw.into())),
                hub_addr: format!("127.0.0.1:{}", hub.port()),
                replicas,
            }),
            controller: ud_core::edge::scheduler::ControllerSettings {
                heartbeat_timeout: timeout,
                check_interval: (timeout / 90).max(Duration::from_millis(100)),
                cancel_grace_seconds: 1,
                placement: Default::default(),
                queues: Default::default(),
                lost_after: Duration::ZERO,
                max_lost_after: Duration::from_secs(7 * 24 * 3600),
            },
            git_credentials: Default::default(),
        }),
        replicas,
        ..ServerConfig::local(urls.join(","), pg.url.clone())
    })
    .await?;
    Ok((hubs, pg, running))
}

/// An admin token, usable through the API once this returns.
pub async fn admin_token(running: &ud_server::Running) -> Result<ud_core::commands::IssuedToken> {
    let admin = ud_core::commands::issue_token(
        running.state.commands.store(),
        &ud_core::commands::NewToken::scoped("bench", &[], true),
        "bench",
    )
    .await
    .map_err(|e| anyhow!("{e}"))?;
    running
        .state
        .projected
        .wait(
            ud_schemas::streams::AUTH,
            admin.seq,
            Duration::from_secs(10),
        )
        .await;
    Ok(admin)
}

pub async fn run(a: Args) -> Result<()> {
    println!("UniDesk edge benchmark: hub + leaf + agent + Docker on this machine");
    let timeout = Duration::from_secs(a.offline_timeout_seconds);
    let (hub, _pg, running) = start_platform(timeout).await?;
    let store = running.state.commands.store().clone();
    let admin = admin_token(&running).await?;
    let http = reqwest::Client::new();
    let base = format!("http://{}", running.addr);
    let token = enroll(&http, &base, &admin.secret, "bench").await?;

    // The node's link goes through a relay the benchmark can cut.
    let relay = ud_testkit::Relay::start(hub.leaf_port()).await?;
    let (leaf, agent) = join(&store, relay.port(), &token, "bench", |_| {}).await?;

    // 1. Submit to container start, warm node (image present), one task at a time.
    let body = json!({
        "project": "bench", "code_repo_url": "https://git.example.org/c.git",
        "code_commit_id": "0123456789abcdef0123456789abcdef01234567",
        "env_repo_url": "https://git.example.org/e.git", "env_commit_id": "0123456789abcdef0123456789abcdef01234567",
        "dockerfile_path": "Dockerfile", "command": ["true"], "resources": {"cpus": 0.1, "memory_mb": 32}
    });
    let mut started = store.client().subscribe("ud.task.*.started").await?;
    let mut lat = Vec::new();
    for _ in 0..a.tasks {
        let t0 = Instant::now();
        let v: serde_json::Value = http
            .post(format!("{base}/api/v1/tasks"))
            .bearer_auth(&admin.secret)
            .json(&body)
            .send()
            .await?
            .json()
            .await?;
        let id = v["task_id"].as_str().unwrap_or_default().to_owned();
        loop {
            let m = tokio::time::timeout(Duration::from_secs(60), started.next())
                .await?
                .ok_or_else(|| anyhow!("no start"))?;
            if m.subject.contains(&id) {
                break;
            }
        }
        lat.push(t0.elapsed());
    }
    lat.sort();
    line(
        "submit-to-container-start p50 (warm node)",
        ms(percentile(&lat, 0.5)),
        "ms",
        None,
    );
    line(
        "submit-to-container-start p99 (warm node)",
        ms(percentile(&lat, 0.99)),
        "ms",
        None,
    );

    // 1b. Versions: cold (nothing cached), warm (repository cached, new commit), hot (same versions).
    versions_figures(&store, &http, &base, &admin.secret, hub.leaf_port()).await?;

    // 2. Heartbeats handled per second: a backlog written while the link is down, then drained.
    relay.cut();
    let local_client =
        async_nats::ConnectOptions::with_user_and_password("agent".into(), "agent-pw".into())
            .connect(format!("127.0.0.1:{}", leaf.port()))
            .await?;
    let local = async_nats::jetstream::with_domain(local_client, edge::domain(&token.node_id));
    let mut acks = futures::stream::FuturesUnordered::new();
    for i in 0..a.heartbeats {
        let beat = Event::Node(
            token.node_id,
            NodeEvent::Heartbeat(NodeHeartbeat {
                at: ud_schemas::now_millis(),
                running_tasks: i as u32 % 3,
                disk_free_mb: Some(100_000),
                low_disk: false,
                gpus: None,
            }),
        );
        let (h, p) =
            ud_schemas::codec::encode_message(&beat, &ud_schemas::codec::EventMeta::new("bench"))?;
        let subject = edge::report_subject(&token.node_id, &beat.subject());
        acks.push(
            local
                .publish_with_headers(subject, h, p.into())
                .await?
                .into_future(),
        );
        if acks.len() >= 256 {
            if let Some(r) = acks.next().await {
                r?;
            }
        }
    }
    while let Some(r) = acks.next().await {
        r?;
    }
    let mut ingested = store
        .client()
        .subscribe(format!("ud.node.{}.heartbeat", token.node_id))
        .await?;
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    relay.restore();
    let mut n = 0;
    while n < a.heartbeats {
        tokio::time::timeout(Duration::from_secs(120), ingested.next())
            .await?
            .ok_or_else(|| anyhow!("drain stopped"))?;
        n += 1;
    }
    let took = t0.elapsed();
    let cpu = cpu_seconds() - cpu0;
    let rate = n as f64 / took.as_secs_f64();
    line(
        "heartbeats ingested per second (backlog drain)",
        rate,
        "hb/s",
        None,
    );
    line(
        "main-server CPU per heartbeat (in-process: ingest, append, projection)",
        cpu / n as f64 * 1e6,
        "us",
        None,
    );
    let needed = 10_000.0 / 15.0;
    line(
        "share of one core for 10,000 nodes at 15 s heartbeats",
        needed * cpu / n as f64 * 100.0,
        "%",
        None,
    );

    // 3. Offline detection: stop the agent, wait for the offline event.
    let mut offline = store
        .client()
        .subscribe(format!("ud.node.{}.offline", token.node_id))
        .await?;
    let mut beats = store
        .client()
        .subscribe(format!("ud.node.{}.heartbeat", token.node_id))
        .await?;
    agent.abort();
    let stopped = Instant::now();
    // The last heartbeat the hub heard.
    let mut last = stopped;
    loop {
        tokio::select! {
            b = beats.next() => { if b.is_some() { last = Instant::now(); } }
            o = offline.next() => {
                o.ok_or_else(|| anyhow!("no offline event"))?;
                break;
            }
            _ = tokio::time::sleep(timeout * 2) => return Err(anyhow!("not marked offline within twice the timeout")),
        }
    }
    let detected = last.elapsed();
    line(
        &format!(
            "offline detected after the last heartbeat (timeout {} s)",
            timeout.as_secs()
        ),
        detected.as_secs_f64(),
        "s",
        None,
    );
    line(
        "offline detection error against the timeout",
        (detected.as_secs_f64() - timeout.as_secs_f64()) * 1000.0,
        "ms",
        None,
    );
    running.shutdown();
    Ok(())
}

fn git(dir: &std::path::Path, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("git")
        .args([
            "-c",
            "user.name=b",
            "-c",
            "user.email=b@localhost",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .output()?;
    if !out.status.success() {
        return Err(anyhow!(
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

fn commit(dir: &std::path::Path, file: &str, text: &str) -> Result<String> {
    std::fs::write(dir.join(file), text)?;
    git(dir, &["add", "-A"])?;
    git(dir, &["commit", "-q", "-m", "bench"])?;
    git(dir, &["rev-parse", "HEAD"])
}

async fn versions_figures(
    store: &ud_core::EventStore,
    http: &reqwest::Client,
    base: &str,
    admin: &str,
    hub_leaf: u16,
) -> Result<()> {
    let repos = tempfile::tempdir()?;
    let (code, env) = (repos.path().join("code"), repos.path().join("env"));
    for d in [&code, &env] {
        std::fs::create_dir_all(d)?;
        git(d, &["init", "-q"])?;
    }
    // A fresh tag per run, so that "cold" really builds.
    let env_commit = commit(
        &env,
        "Dockerfile",
        &format!(
            "FROM unidesk/busybox:base\nRUN echo {} > /env\n",
            ud_schemas::now_millis()
        ),
    )?;
    let c1 = commit(&code, "main.sh", "true\n")?;
    let token = enroll(http, base, admin, "builder").await?;
    let work = tempfile::tempdir()?;
    let (_leaf, agent) = join(store, hub_leaf, &token, "builder", |cfg| {
        cfg.labels = [("role".to_owned(), "builder".to_owned())].into();
        cfg.image = None;
        cfg.work_dir = work.path().to_owned();
    })
    .await?;
    let started = store.client().subscribe("ud.task.*.started").await?;
    let prepared = store.client().subscribe("ud.task.*.prepared").await?;
    let url = |d: &std::path::Path| format!("file://{}", d.display());
    let body = |code_commit: &str| {
        json!({
            "project": "bench", "code_repo_url": url(&code), "code_commit_id": code_commit,
            "env_repo_url": url(&env), "env_commit_id": env_commit, "dockerfile_path": "Dockerfile",
            "command": ["sh", "main.sh"], "resources": {"cpus": 0.1, "memory_mb": 32, "labels": {"role": "builder"}}
        })
    };
    let dispatched = store.client().subscribe("ud.dispatch.*.*.run").await?;
    let mut subs = (started, prepared, dispatched);
    let step = |steps: &[ud_schemas::events::PrepareStep], name: &str| {
        steps
            .iter()
            .find(|s| s.name == name)
            .map_or(0.0, |s| s.millis as f64)
    };
    let (cold, s1) = run_one(http, base, admin, body(&c1), &mut subs).await?;
    line("cold node: submit to running", ms(cold.0), "ms", None);
    line(
        "cold node: dispatch to running (seen at the hub)",
        ms(cold.1),
        "ms",
        None,
    );
    line(
        "cold node: git fetch (code + environment)",
        step(&s1, "fetch_code") + step(&s1, "fetch_environment"),
        "ms",
        None,
    );
    line(
        "cold node: image build",
        step(&s1, "build_image"),
        "ms",
        None,
    );
    let c2 = commit(&code, "main.sh", "echo v2\n")?;
    let (warm, s2) = run_one(http, base, admin, body(&c2), &mut subs).await?;
    line(
        "warm node (new commit): submit to running",
        ms(warm.0),
        "ms",
        None,
    );
    line(
        "warm node (new commit): dispatch to running (seen at the hub)",
        ms(warm.1),
        "ms",
        None,
    );
    line(
        "warm node: fetch of the new commit (target < 200 ms)",
        step(&s2, "fetch_code"),
        "ms",
        None,
    );
    let (mut hot, mut hot_dispatch, mut hot_node) = (Vec::new(), Vec::new(), Vec::new());
    let mut by_step: std::collections::BTreeMap<String, Vec<Duration>> = Default::default();
    for _ in 0..10 {
        let ((total, from_dispatch), steps) =
            run_one(http, base, admin, body(&c2), &mut subs).await?;
        hot.push(total);
        hot_dispatch.push(from_dispatch);
        hot_node.push(Duration::from_millis(steps.iter().map(|s| s.millis).sum()));
        for s in &steps {
            by_step
                .entry(s.name.clone())
                .or_default()
                .push(Duration::from_millis(s.millis));
        }
    }
    for v in [&mut hot, &mut hot_dispatch, &mut hot_node] {
        v.sort();
    }
    line(
        "hot node (same versions): submit to running p50",
        ms(percentile(&hot, 0.5)),
        "ms",
        None,
    );
    line(
        "hot node (same versions): submit to running max",
        ms(percentile(&hot, 1.0)),
        "ms",
        None,
    );
    line(
        "hot node: dispatch to running, seen at the hub, p50 (target < 300 ms)",
        ms(percentile(&hot_dispatch, 0.5)),
        "ms",
        None,
    );
    line(
        "hot node: dispatch to running, seen at the hub, max",
        ms(percentile(&hot_dispatch, 1.0)),
        "ms",
        None,
    );
    line(
        "hot node: the node's own preparing steps incl. container start, p50",
        ms(percentile(&hot_node, 0.5)),
        "ms",
        None,
    );
    for (name, mut v) in by_step {
        v.sort();
        line(
            &format!("hot node: step {name} p50"),
            ms(percentile(&v, 0.5)),
            "ms",
            None,
        );
    }
    agent.abort();
    Ok(())
}

async fn run_one(
    http: &reqwest::Client,
    base: &str,
    admin: &str,
    body: serde_json::Value,
    subs: &mut (
        async_nats::Subscriber,
        async_nats::Subscriber,
        async_nats::Subscriber,
    ),
) -> Result<((Duration, Duration), Vec<ud_schemas::events::PrepareStep>)> {
    let t0 = Instant::now();
    let v: serde_json::Value = http
        .post(format!("{base}/api/v1/tasks"))
        .bearer_auth(admin)
        .json(&body)
        .send()
        .await?
        .json()
        .await?;
    let id = v["task_id"].as_str().unwrap_or_default().to_owned();
    let dispatched = loop {
        let m = tokio::time::timeout(Duration::from_secs(120), subs.2.next())
            .await?
            .ok_or_else(|| anyhow!("no dispatch"))?;
        if m.subject.contains(&id) {
            break Instant::now();
        }
    };
    let steps = loop {
        let m = tokio::time::timeout(Duration::from_secs(120), subs.1.next())
            .await?
            .ok_or_else(|| anyhow!("no prepared"))?;
        if m.subject.contains(&id) {
            let p: ud_schemas::events::TaskPrepared =
                ud_schemas::dispatch::from_cbor(&m.payload, "task-prepared")?;
            break p.steps;
        }
    };
    loop {
        let m = tokio::time::timeout(Duration::from_secs(120), subs.0.next())
            .await?
            .ok_or_else(|| anyhow!("no start"))?;
        if m.subject.contains(&id) {
            break;
        }
    }
    Ok(((t0.elapsed(), dispatched.elapsed()), steps))
}

/// Enrols a node named `name` through the API; its token.
pub(crate) async fn enroll(
    http: &reqwest::Client,
    base: &str,
    admin: &str,
    name: &str,
) -> Result<NodeToken> {
    let v: serde_json::Value = http
        .post(format!("{base}/api/v1/nodes"))
        .bearer_auth(admin)
        .json(&json!({ "name": name }))
        .send()
        .await?
        .json()
        .await?;
    NodeToken::parse(v["token"].as_str().unwrap_or_default()).map_err(|e| anyhow!(e))
}

/// Starts a node's leaf server (linked to the hub through `hub_leaf`) and its
/// agent, and waits for its first heartbeat at the hub.
pub(crate) async fn join(
    store: &ud_core::EventStore,
    hub_leaf: u16,
    token: &NodeToken,
    name: &str,
    configure: impl FnOnce(&mut ud_edge_agent::AgentConfig),
) -> Result<(NatsServer, tokio::task::JoinHandle<()>)> {
    let leaf = crate::sim::leaf_server(hub_leaf, token).await?;
    let mut cfg = ud_edge_agent::AgentConfig {
        leaf_url: format!("nats://agent:agent-pw@127.0.0.1:{}", leaf.port()),
        node_id: token.node_id,
        name: name.into(),
        labels: Default::default(),
        heartbeat_interval: Duration::from_secs(1),
        image: Some("unidesk/busybox:base".into()),
        work_dir: std::env::temp_dir().join(format!("ud-edge-{}", token.node_id)),
        build_timeout: Duration::from_secs(600),
        min_free_disk_mb: 0,
        cache_limit_mb: 1 << 20,
        docker_host: std::env::var("DOCKER_HOST").ok(),
        ..ud_edge_agent::AgentConfig::new(String::new(), token.node_id, String::new())
    };
    configure(&mut cfg);
    let mut beat = store
        .client()
        .subscribe(format!("ud.node.{}.heartbeat", token.node_id))
        .await?;
    let agent = tokio::spawn(async move {
        let _ = ud_edge_agent::run(cfg).await;
    });
    tokio::time::timeout(Duration::from_secs(60), beat.next()).await?;
    Ok((leaf, agent))
}
