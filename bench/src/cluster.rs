//! `ud-bench cluster`: the main server on a three-server JetStream cluster
//! (streams with three replicas, every write synced) under a steady load of
//! REST submissions; one server is killed with SIGKILL midway. Prints
//! throughput and latency before, during (the first seconds after) and after
//! the kill, the longest pause, and checks no acknowledged task was lost.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use serde_json::{json, Value};
use ud_schemas::streams;
use ud_server::{self as server, ServerConfig};
use ud_testkit::{NatsServer, PgDatabase};

use crate::stats::{ms, percentile};

#[derive(Parser)]
pub struct Args {
    /// Submissions per second offered.
    #[arg(long, default_value_t = 100)]
    rate: u64,
    /// Seconds of load before the kill, and after it.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Which member to kill: 1 is the one listed first (the server's first connection).
    #[arg(long, default_value_t = 1)]
    kill: usize,
}

fn task() -> Value {
    json!({
        "project": "bench", "code_repo_url": "https://git.example.org/c.git",
        "code_commit_id": "0123456789abcdef0123456789abcdef01234567",
        "env_repo_url": "https://git.example.org/e.git", "env_commit_id": "0123456789abcdef0123456789abcdef01234567",
        "dockerfile_path": "Dockerfile", "command": ["true"]
    })
}

pub async fn run(a: Args) -> Result<()> {
    let mut nats = NatsServer::cluster(true).await?;
    let pg = PgDatabase::create().await?;
    let url = nats
        .iter()
        .map(NatsServer::url)
        .collect::<Vec<_>>()
        .join(",");
    let running = server::start(ServerConfig {
        replicas: 3,
        ..ServerConfig::local(url, pg.url.clone())
    })
    .await?;
    let store = running.state.commands.store().clone();
    let issued = ud_core::commands::issue_token(
        &store,
        &ud_core::commands::NewToken::scoped("bench", &["bench".into()], false),
        "bench",
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    running
        .state
        .projected
        .wait(streams::AUTH, issued.seq, Duration::from_secs(10))
        .await;
    let (http, base) = (reqwest::Client::new(), format!("http://{}", running.addr));
    println!(
        "UniDesk on a 3-server JetStream cluster (R3, every write synced): {} submissions/s offered, n{} killed after {} s",
        a.rate, a.kill, a.seconds
    );

    // (sent at, latency, acknowledged task id)
    let mut results: Vec<(Instant, Duration, Option<String>)> = Vec::new();
    let start = Instant::now();
    let mut killed_at = None;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / a.rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut inflight = tokio::task::JoinSet::new();
    while start.elapsed() < Duration::from_secs(2 * a.seconds) {
        tick.tick().await;
        if killed_at.is_none() && start.elapsed() >= Duration::from_secs(a.seconds) {
            if let Some(server) = nats.get_mut(a.kill.saturating_sub(1)) {
                server.kill().await?;
            }
            killed_at = Some(Instant::now());
        }
        let (http, url, token) = (
            http.clone(),
            format!("{base}/api/v1/tasks"),
            issued.secret.clone(),
        );
        inflight.spawn(async move {
            let sent = Instant::now();
            let resp = http
                .post(url)
                .bearer_auth(token)
                .timeout(Duration::from_secs(10))
                .json(&task())
                .send()
                .await;
            let id = match resp {
                Ok(r) if r.status().as_u16() == 202 => r
                    .json::<Value>()
                    .await
                    .ok()
                    .and_then(|v| v["task_id"].as_str().map(str::to_owned)),
                _ => None,
            };
            (sent, sent.elapsed(), id)
        });
        while let Some(done) = inflight.try_join_next() {
            results.push(done?);
        }
    }
    while let Some(done) = inflight.join_next().await {
        results.push(done?);
    }
    let killed_at = killed_at.unwrap_or(start);

    let phase = |from: Instant, to: Instant| -> (usize, usize, Vec<Duration>) {
        let mut lat = Vec::new();
        let (mut ok, mut refused) = (0, 0);
        for (sent, took, id) in &results {
            if *sent >= from && *sent < to {
                match id {
                    Some(_) => {
                        ok += 1;
                        lat.push(*took);
                    }
                    None => refused += 1,
                }
            }
        }
        lat.sort();
        (ok, refused, lat)
    };
    let during_end = killed_at + Duration::from_secs(5);
    let end = start + Duration::from_secs(2 * a.seconds + 1);
    for (name, from, to) in [
        ("before the kill", start, killed_at),
        ("0-5 s after the kill", killed_at, during_end),
        ("after that", during_end, end),
    ] {
        let (ok, refused, lat) = phase(from, to);
        let secs = to
            .min(start + Duration::from_secs(2 * a.seconds))
            .saturating_duration_since(from)
            .as_secs_f64()
            .max(0.001);
        println!(
            "{name:<22} {:>7.1} acknowledged/s  {refused:>5} refused  latency p50 {:>7.1} ms  p99 {:>7.1} ms",
            ok as f64 / secs,
            ms(percentile(&lat, 0.50)),
            ms(percentile(&lat, 0.99))
        );
    }
    let mut acked: Vec<(Instant, &String)> = results
        .iter()
        .filter_map(|(s, d, id)| id.as_ref().map(|i| (*s + *d, i)))
        .collect();
    acked.sort();
    let gap = acked
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .max()
        .unwrap_or_default();
    println!(
        "longest pause between acknowledgements: {:.0} ms",
        gap.as_secs_f64() * 1000.0
    );
    let mut lost = 0;
    for (_, id) in &acked {
        if store.load_task(&id.parse()?).await?.is_none() {
            lost += 1;
        }
    }
    println!(
        "acknowledged tasks missing from the stream: {lost} of {}",
        acked.len()
    );
    if lost > 0 {
        bail!("{lost} acknowledged tasks lost");
    }
    running.shutdown();
    Ok(())
}
