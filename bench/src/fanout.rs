//! `ud-bench fanout`: a pipeline whose one matrix step fans out into N steps
//! against N plain tasks submitted through REST, on the same platform in the
//! same run (simulated nodes speaking the real protocol, as in `lifecycle`):
//! the time from the first submission until every task's run is dispatched
//! to a node, and until every one has succeeded.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use futures::StreamExt;
use serde_json::json;

use crate::stats::line;

#[derive(clap::Args)]
pub struct Args {
    /// Steps in the fan-out, and plain tasks beside it.
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    /// Simulated nodes.
    #[arg(long, default_value_t = 10)]
    nodes: usize,
    /// REST submissions in flight for the plain tasks.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

fn fields() -> serde_json::Value {
    json!({
        "code_repo_url": "https://git.example.org/c.git",
        "code_commit_id": "0123456789abcdef0123456789abcdef01234567",
        "env_repo_url": "https://git.example.org/e.git",
        "env_commit_id": "0123456789abcdef0123456789abcdef01234567",
        "dockerfile_path": "Dockerfile", "command": ["true"],
        "resources": {"cpus": 0.1, "memory_mb": 32}
    })
}

/// Counts the runs dispatched from now on; answers how long until `n` were.
struct Dispatches {
    seen: tokio::sync::watch::Receiver<usize>,
    task: tokio::task::JoinHandle<()>,
}

impl Dispatches {
    async fn watch(client: &async_nats::Client) -> Result<Self> {
        let mut runs = client.subscribe("ud.dispatch.*.*.run").await?;
        let (tx, rx) = tokio::sync::watch::channel(0usize);
        let task = tokio::spawn(async move {
            let mut tasks = HashSet::new();
            while let Some(m) = runs.next().await {
                if tasks.insert(m.subject.to_string()) {
                    let _ = tx.send(tasks.len());
                }
            }
        });
        Ok(Self { seen: rx, task })
    }

    async fn until(&mut self, n: usize) -> Result<()> {
        let wait = self.seen.wait_for(|seen| *seen >= n);
        tokio::time::timeout(Duration::from_secs(300), wait)
            .await
            .map_err(|_| anyhow!("fewer than {n} runs dispatched in 300 s"))??;
        Ok(())
    }
}

async fn succeeded(db: &tokio_postgres::Client, project: &str) -> Result<i64> {
    Ok(db
        .query_one(
            "SELECT count(*) FROM tasks WHERE state = 'succeeded' AND project = $1",
            &[&project],
        )
        .await?
        .get(0))
}

async fn until_succeeded(db: &tokio_postgres::Client, project: &str, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while (succeeded(db, project).await? as usize) < n {
        if Instant::now() > deadline {
            bail!("fewer than {n} tasks of {project} succeeded in 300 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

pub async fn run(a: Args) -> Result<()> {
    let crate::sim::SimPlatform {
        running,
        store,
        admin,
        http,
        base,
        db,
        sims,
        // The servers live as long as the run.
        hubs: _hubs,
        pg: _pg,
    } = crate::sim::SimPlatform::start(a.nodes, false, false).await?;
    println!(
        "{} steps against {} plain tasks, {} simulated nodes",
        a.steps, a.steps, a.nodes
    );

    // Plain tasks through REST, as many in flight as a busy client keeps.
    let mut dispatches = Dispatches::watch(store.client()).await?;
    let start = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(a.concurrency));
    let mut handles = Vec::with_capacity(a.steps);
    for _ in 0..a.steps {
        let permit = sem.clone().acquire_owned().await?;
        let (http, url, token) = (
            http.clone(),
            format!("{base}/api/v1/tasks"),
            admin.secret.clone(),
        );
        let mut body = fields();
        body["project"] = json!("plain");
        handles.push(tokio::spawn(async move {
            let ok = http
                .post(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            drop(permit);
            ok
        }));
    }
    for h in handles {
        if !h.await.unwrap_or(false) {
            bail!("a plain task was refused");
        }
    }
    dispatches.until(a.steps).await?;
    let plain_dispatched = start.elapsed();
    until_succeeded(&db, "plain", a.steps).await?;
    let plain_done = start.elapsed();
    dispatches.task.abort();

    // One pipeline, one matrix step of as many values.
    let mut dispatches = Dispatches::watch(store.client()).await?;
    let values: Vec<String> = (0..a.steps).map(|i| i.to_string()).collect();
    let mut step = fields();
    step["name"] = json!("fan");
    step["matrix"] = json!({"i": values});
    let start = Instant::now();
    let resp = http
        .post(format!("{base}/api/v1/pipelines"))
        .bearer_auth(&admin.secret)
        .json(&json!({"project": "fanout", "steps": [step]}))
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("the pipeline was refused: {}", resp.text().await?);
    }
    let accepted = start.elapsed();
    dispatches.until(a.steps).await?;
    let fan_dispatched = start.elapsed();
    until_succeeded(&db, "fanout", a.steps).await?;
    let fan_done = start.elapsed();
    dispatches.task.abort();

    let secs = |d: Duration| d.as_secs_f64() * 1000.0;
    line(
        &format!(
            "{} plain tasks: first submission to all dispatched",
            a.steps
        ),
        secs(plain_dispatched),
        "ms",
        None,
    );
    line(
        &format!(
            "a fan-out of {} steps: submission to all dispatched",
            a.steps
        ),
        secs(fan_dispatched),
        "ms",
        Some((secs(plain_dispatched), "plain tasks")),
    );
    line(
        "  of which the pipeline's submission (its first decision stored)",
        secs(accepted),
        "ms",
        None,
    );
    line(
        "plain tasks: to all succeeded",
        secs(plain_done),
        "ms",
        None,
    );
    line(
        "fan-out: to all succeeded",
        secs(fan_done),
        "ms",
        Some((secs(plain_done), "plain tasks")),
    );
    drop(sims);
    running.shutdown();
    Ok(())
}
