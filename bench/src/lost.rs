//! `ud-bench lost`: many tasks running on a node that goes silent. The
//! scheduler marks every one lost and places it again; meanwhile it keeps
//! placing new work. Figures: from the node's `offline` event to the last
//! `lost` event, and submit-to-dispatch of tasks placed on another node
//! during that time.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use futures::StreamExt;
use serde_json::json;
use ud_schemas::edge::NodeToken;

use crate::stats::{line, ms, percentile};

#[derive(clap::Args)]
pub struct Args {
    /// Tasks running on the node that goes silent.
    #[arg(long, default_value_t = 1_000)]
    tasks: usize,
    /// Seconds of silence before a node is offline.
    #[arg(long, default_value_t = 3.0)]
    heartbeat_timeout_seconds: f64,
    /// Submissions per second to the other node while the tasks are lost.
    #[arg(long, default_value_t = 50)]
    rate: usize,
}

fn body() -> serde_json::Value {
    json!({
        "project": "bench", "code_repo_url": "https://git.example.org/c.git",
        "code_commit_id": "0123456789abcdef0123456789abcdef01234567",
        "env_repo_url": "https://git.example.org/e.git", "env_commit_id": "0123456789abcdef0123456789abcdef01234567",
        "dockerfile_path": "Dockerfile", "command": ["true"], "resources": {"cpus": 0.1, "memory_mb": 32}
    })
}

async fn count(pg: &tokio_postgres::Client, state: &str) -> Result<i64> {
    Ok(pg
        .query_one("SELECT count(*) FROM tasks WHERE state = $1", &[&state])
        .await?
        .get(0))
}

pub async fn run(a: Args) -> Result<()> {
    let timeout = Duration::from_secs_f64(a.heartbeat_timeout_seconds);
    let (hubs, pg, running) = crate::edge::start_platform_on(timeout, true, false).await?;
    let hub = &hubs[0];
    let store = running.state.commands.store().clone();
    let admin = crate::edge::admin_token(&running).await?;
    let http = reqwest::Client::new();
    let base = format!("http://{}", running.addr);
    let enroll = |name: &'static str| {
        let (http, base, admin) = (http.clone(), base.clone(), admin.secret.clone());
        async move {
            let v: serde_json::Value = http
                .post(format!("{base}/api/v1/nodes"))
                .bearer_auth(&admin)
                .json(&json!({"name": name}))
                .send()
                .await?
                .json()
                .await?;
            NodeToken::parse(v["token"].as_str().unwrap_or_default()).map_err(|e| anyhow!(e))
        }
    };
    let (doomed_token, other_token) = (enroll("doomed").await?, enroll("other").await?);
    let doomed = crate::sim::join(
        hub.leaf_port(),
        &doomed_token,
        "doomed".into(),
        &store,
        false,
    )
    .await?;
    let (db, conn) = tokio_postgres::connect(&pg.url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);

    // The doomed node runs every task (started, never finished).
    let submit = {
        let (http, url, token) = (
            http.clone(),
            format!("{base}/api/v1/tasks"),
            admin.secret.clone(),
        );
        move || {
            let (http, url, token) = (http.clone(), url.clone(), token.clone());
            async move {
                let v: serde_json::Value = http
                    .post(url)
                    .bearer_auth(token)
                    .json(&body())
                    .send()
                    .await?
                    .json()
                    .await?;
                Ok::<_, anyhow::Error>(v["task_id"].as_str().unwrap_or_default().to_owned())
            }
        }
    };
    let mut ids = Vec::with_capacity(a.tasks);
    for chunk in (0..a.tasks).collect::<Vec<_>>().chunks(64) {
        let batch = futures::future::join_all(chunk.iter().map(|_| submit())).await;
        for id in batch {
            ids.push(id?);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while (count(&db, "running").await? as usize) < a.tasks {
        anyhow::ensure!(Instant::now() < deadline, "the tasks never all ran");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    line("tasks running on the node", a.tasks as f64, "", None);
    // Another node, where new work and the lost tasks go.
    let _other =
        crate::sim::join(hub.leaf_port(), &other_token, "other".into(), &store, true).await?;

    // Silence: the node goes offline after the timeout and its tasks are lost.
    let client = store.client().clone();
    let mut offline = client
        .subscribe(format!("ud.node.{}.offline", doomed_token.node_id))
        .await?;
    let mut lost = client.subscribe("ud.task.*.lost").await?;
    let mut dispatched = client
        .subscribe(format!("ud.dispatch.{}.*.run", other_token.node_id))
        .await?;
    doomed.silence();
    tokio::time::timeout(timeout * 10, offline.next())
        .await
        .map_err(|_| anyhow!("the node never went offline"))?;
    let went = Instant::now();
    // New work for the other node while the tasks are being lost.
    let gap = Duration::from_secs_f64(1.0 / a.rate as f64);
    let probes = tokio::spawn({
        let submit = submit.clone();
        async move {
            let mut sent = Vec::new();
            let start = Instant::now();
            for i in 0..a.rate * 3 {
                tokio::time::sleep_until((start + gap * i as u32).into()).await;
                if let Ok(id) = submit().await {
                    sent.push((id, Instant::now()));
                }
            }
            sent
        }
    });
    let mut last_lost = went;
    let mut seen = 0;
    while seen < a.tasks {
        match tokio::time::timeout(Duration::from_secs(60), lost.next()).await {
            Ok(Some(_)) => {
                seen += 1;
                last_lost = Instant::now();
            }
            _ => break,
        }
    }
    let sent = probes.await?;
    let mut arrived: HashMap<String, Instant> = HashMap::new();
    let until = Instant::now() + Duration::from_secs(30);
    while arrived.len() < sent.len() + a.tasks && Instant::now() < until {
        match tokio::time::timeout(Duration::from_secs(5), dispatched.next()).await {
            Ok(Some(m)) => {
                let task = m.subject.split('.').nth(3).unwrap_or_default().to_owned();
                arrived.entry(task).or_insert_with(Instant::now);
            }
            _ => break,
        }
    }
    line("tasks marked lost", seen as f64, "", None);
    line(
        "offline event to the last lost event",
        ms(last_lost.duration_since(went)),
        "ms",
        None,
    );
    let mut lat: Vec<Duration> = sent
        .iter()
        .filter_map(|(id, t)| arrived.get(id).map(|d| d.saturating_duration_since(*t)))
        .collect();
    lat.sort();
    line(
        "submit-to-dispatch on the other node meanwhile, p50",
        ms(percentile(&lat, 0.5)),
        "ms",
        None,
    );
    line(
        "submit-to-dispatch on the other node meanwhile, p99",
        ms(percentile(&lat, 0.99)),
        "ms",
        None,
    );
    line(
        "lost tasks placed again on the other node",
        arrived.len().saturating_sub(sent.len()) as f64,
        "",
        None,
    );
    running.shutdown();
    Ok(())
}
