//! `ud-bench lifecycle`: the whole task lifecycle on real servers — REST
//! submit, scheduler placement, dispatch through JetStream to the node's leaf
//! server, the node's `started` and `succeeded` reported through its own
//! stream and forwarded to the hub, ingest, and the PostgreSQL projection.
//!
//! The nodes are simulated agents speaking the real protocol over real links:
//! each has its own leaf nats-server (its own JetStream domain and
//! credentials) and pulls its dispatches as `unidesk-edge` does, but finishes
//! a task at once instead of running a container. Figures: submit-to-dispatch
//! latency at a steady rate, and tasks per second from the first submission
//! until the last task is projected as succeeded, with the hub syncing every
//! write and with the default sync.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use futures::StreamExt;
use serde_json::json;
use tokio::sync::Mutex;
use ud_schemas::edge;

use crate::stats::{line, ms, percentile};

#[derive(clap::Args)]
pub struct Args {
    /// Simulated nodes, each with its own leaf nats-server.
    #[arg(long, default_value_t = 20)]
    nodes: usize,
    /// Tasks pushed through the whole lifecycle for the throughput figure.
    #[arg(long, default_value_t = 10_000)]
    tasks: usize,
    /// Submissions per second for the latency figure.
    #[arg(long, default_value_t = 500)]
    rate: usize,
    /// Seconds at that rate.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// REST submissions in flight during the throughput run.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Measure only this sync mode: `always` or `default` (both when absent).
    #[arg(long)]
    sync: Option<String>,
    /// Run the hub as a three-server cluster (streams with three replicas;
    /// the simulated nodes link to the first member).
    #[arg(long)]
    cluster: bool,
    /// Print the read model's tasks by state every second of the throughput run.
    #[arg(long)]
    progress: bool,
    /// No-op tasks for the Celery baseline, measured once before the modes
    /// (where `scripts/bench.sh` set up its broker).
    #[arg(long, default_value_t = 5_000)]
    baseline_tasks: usize,
}

fn task_body() -> serde_json::Value {
    json!({
        "project": "bench", "code_repo_url": "https://git.example.org/c.git",
        "code_commit_id": "0123456789abcdef0123456789abcdef01234567",
        "env_repo_url": "https://git.example.org/e.git", "env_commit_id": "0123456789abcdef0123456789abcdef01234567",
        "dockerfile_path": "Dockerfile", "command": ["true"], "resources": {"cpus": 0.1, "memory_mb": 32}
    })
}

async fn succeeded(pg: &tokio_postgres::Client) -> Result<i64> {
    Ok(pg
        .query_one("SELECT count(*) FROM tasks WHERE state = 'succeeded'", &[])
        .await?
        .get(0))
}

async fn one_mode(a: &Args, sync_always: bool, baseline: Option<f64>) -> Result<()> {
    let mode = if sync_always {
        "hub syncing every write"
    } else {
        "hub default sync"
    };
    if a.cluster {
        println!("-- {mode}, hub of three clustered servers (three replicas)");
    } else {
        println!("-- {mode}");
    }
    let crate::sim::SimPlatform {
        hubs,
        pg,
        running,
        store,
        admin,
        http,
        base,
        db,
        sims,
    } = crate::sim::SimPlatform::start(a.nodes, sync_always, a.cluster).await?;
    line("simulated nodes online", a.nodes as f64, "", None);

    // 1. Submit-to-dispatch at a steady rate: the dispatch as the hub stores it.
    let mut dispatches = store.client().subscribe("ud.dispatch.*.*.run").await?;
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let watcher = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(m) = dispatches.next().await {
                let task = m.subject.split('.').nth(3).unwrap_or_default().to_owned();
                seen.lock().await.entry(task).or_insert_with(Instant::now);
            }
        })
    };
    let n = a.rate * a.seconds as usize;
    let gap = Duration::from_secs_f64(1.0 / a.rate as f64);
    let url = format!("{base}/api/v1/tasks");
    let start = Instant::now();
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        tokio::time::sleep_until((start + gap * i as u32).into()).await;
        let (http, url, token) = (http.clone(), url.clone(), admin.secret.clone());
        handles.push(tokio::spawn(async move {
            let t = Instant::now();
            let wall = unix_nanos();
            let v: serde_json::Value = http
                .post(&url)
                .bearer_auth(token)
                .json(&task_body())
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            Some((v["task_id"].as_str()?.to_owned(), t, wall))
        }));
    }
    let mut sent = Vec::with_capacity(n);
    for h in handles {
        if let Some(x) = h.await.ok().flatten() {
            sent.push(x);
        }
    }
    let offered = n as f64 / start.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(120);
    while (succeeded(&db).await? as usize) < sent.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    watcher.abort();
    let seen = seen.lock().await;
    let mut lat: Vec<Duration> = sent
        .iter()
        .filter_map(|(id, t, _)| seen.get(id).map(|d| d.saturating_duration_since(*t)))
        .collect();
    lat.sort();
    line("submissions offered", offered, "tasks/s", None);
    line(
        "submit-to-dispatch p50",
        ms(percentile(&lat, 0.5)),
        "ms",
        None,
    );
    line(
        "submit-to-dispatch p99 (target < 20 ms at 500/s)",
        ms(percentile(&lat, 0.99)),
        "ms",
        None,
    );
    line(
        "dispatches seen / accepted submissions",
        lat.len() as f64,
        &format!("of {}", sent.len()),
        None,
    );
    drop(seen);
    stages(store.jetstream(), &sent).await;
    if a.cluster {
        leaders(&store).await;
    }

    // 2. Whole lifecycle as fast as it goes: submitted -> dispatched ->
    // running -> succeeded -> projected.
    let hub_before = hub_messages(store.jetstream()).await;
    let before = succeeded(&db).await?;
    let hub_dirs: Vec<&std::path::Path> = hubs.iter().map(|h| h.dir()).collect();
    let cpu_before = crate::cpu::by_group(&hub_dirs);
    let start = Instant::now();
    let sampler = a.progress.then(|| {
        let url = pg.url.clone();
        let js = store.jetstream().clone();
        tokio::spawn(async move {
            let Ok((db, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await else {
                return;
            };
            tokio::spawn(conn);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if let Ok(rows) = db
                    .query(
                        "SELECT state, count(*) FROM tasks GROUP BY state ORDER BY state",
                        &[],
                    )
                    .await
                {
                    let counts: Vec<String> = rows
                        .iter()
                        .map(|r| format!("{} {}", r.get::<_, String>(0), r.get::<_, i64>(1)))
                        .collect();
                    let last = match js.get_stream(ud_schemas::streams::TASKS).await {
                        Ok(mut st) => st.info().await.map(|i| i.state.last_sequence).unwrap_or(0),
                        Err(_) => 0,
                    };
                    let projected: i64 = db
                        .query_opt(
                            "SELECT seq FROM projection_checkpoints WHERE stream = $1",
                            &[&ud_schemas::streams::TASKS],
                        )
                        .await
                        .ok()
                        .flatten()
                        .map_or(0, |r| r.get(0));
                    println!(
                        "  {:>5.1} s: {} | stream {last}, projected {projected}",
                        start.elapsed().as_secs_f64(),
                        counts.join(", ")
                    );
                }
            }
        })
    });
    let sem = Arc::new(tokio::sync::Semaphore::new(a.concurrency));
    let mut handles = Vec::with_capacity(a.tasks);
    for _ in 0..a.tasks {
        let permit = sem.clone().acquire_owned().await?;
        let (http, url, token) = (http.clone(), url.clone(), admin.secret.clone());
        handles.push(tokio::spawn(async move {
            let ok = http
                .post(&url)
                .bearer_auth(token)
                .json(&task_body())
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            drop(permit);
            ok
        }));
    }
    let mut accepted = 0;
    for h in handles {
        if h.await.unwrap_or(false) {
            accepted += 1;
        }
    }
    let submit_time = start.elapsed();
    let target = before + accepted;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut done = succeeded(&db).await?;
    while done < target && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        done = succeeded(&db).await?;
    }
    let total = start.elapsed();
    let cpu_after = crate::cpu::by_group(&hub_dirs);
    if let Some(s) = sampler {
        s.abort();
    }
    line(
        "REST submissions accepted",
        accepted as f64 / submit_time.as_secs_f64(),
        "tasks/s",
        None,
    );
    line(
        &format!(
            "whole lifecycle, submit to projected succeeded ({} of {accepted} tasks)",
            done - before
        ),
        (done - before) as f64 / total.as_secs_f64(),
        "tasks/s",
        baseline.map(|b| (b, "Celery")),
    );
    crate::cpu::print_delta(
        &cpu_before,
        &cpu_after,
        total.as_secs_f64(),
        u64::try_from(done - before).unwrap_or(0),
    );
    // What bounds it when every write is synced: the hub stores each message
    // with a sync of its own (no group commit for one replica), so its
    // disk's sync rate divided by the messages a task costs is a ceiling.
    // (A cluster syncs its Raft log once per batch: no such ceiling.)
    let per_task =
        (hub_messages(store.jetstream()).await - hub_before) as f64 / (done - before).max(1) as f64;
    line(
        "hub messages stored per task (all streams)",
        per_task,
        "",
        None,
    );
    if sync_always && !a.cluster {
        let syncs = disk_syncs_per_second(Duration::from_secs(2))?;
        line(
            "  one writer's syncs per second on this disk",
            syncs,
            "/s",
            None,
        );
        line(
            "  ceiling: syncs per second / messages per task",
            syncs / per_task.max(1e-9),
            "tasks/s",
            None,
        );
    }
    drop(sims);
    running.shutdown();
    Ok(())
}

fn unix_nanos() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// From `earlier` to `later` (Unix nanoseconds); zero if out of order.
fn between(earlier: i128, later: i128) -> Duration {
    Duration::from_nanos(u64::try_from(later - earlier).unwrap_or(0))
}

/// Where submit-to-dispatch time goes, from the hub's store times of each
/// task's `submitted`, its `assigned` and its run dispatch.
async fn stages(js: &async_nats::jetstream::Context, sent: &[(String, Instant, i128)]) {
    let (Ok(tasks), Ok(dispatches)) = (
        js.get_stream_no_info(ud_schemas::streams::TASKS).await,
        js.get_stream_no_info(edge::DISPATCH).await,
    ) else {
        return;
    };
    let stored = |s: &async_nats::jetstream::stream::Stream<()>, filter: String| {
        let s = s.clone();
        async move {
            s.direct_get_last_for_subject(filter)
                .await
                .ok()
                .map(|m| m.time.unix_timestamp_nanos())
        }
    };
    let (mut submit, mut assign, mut dispatch) = (Vec::new(), Vec::new(), Vec::new());
    for (id, _, wall) in sent.iter().step_by((sent.len() / 1000).max(1)) {
        let (Some(s), Some(a), Some(d)) = (
            stored(&tasks, format!("ud.task.{id}.submitted")).await,
            stored(&tasks, format!("ud.task.{id}.assigned")).await,
            stored(&dispatches, format!("ud.dispatch.*.{id}.run")).await,
        ) else {
            continue;
        };
        submit.push(between(*wall, s));
        assign.push(between(s, a));
        dispatch.push(between(a, d));
    }
    // Gaps between consecutive stores in each stream over the window: when a
    // stream is busy they show what one stored message costs it.
    for (name, stream) in [
        (ud_schemas::streams::TASKS, &tasks),
        (edge::DISPATCH, &dispatches),
    ] {
        let Ok(info) = js
            .get_stream(name)
            .await
            .map(|s| s.cached_info().state.clone())
        else {
            continue;
        };
        let mut times = Vec::new();
        let first = info
            .last_sequence
            .saturating_sub(20_000)
            .max(info.first_sequence);
        for seq in first..=info.last_sequence {
            if let Ok(m) = stream.direct_get(seq).await {
                times.push(m.time.unix_timestamp_nanos());
            }
        }
        let mut gaps: Vec<Duration> = times.windows(2).map(|w| between(w[0], w[1])).collect();
        gaps.sort();
        let span = times.last().zip(times.first()).map_or(0, |(l, f)| l - f) as f64 / 1e9;
        println!(
            "  {name} last {} stores: {:.0}/s, gap p10 {:.3} ms p50 {:.3} ms p90 {:.3} ms",
            times.len(),
            times.len() as f64 / span.max(1e-9),
            ms(percentile(&gaps, 0.1)),
            ms(percentile(&gaps, 0.5)),
            ms(percentile(&gaps, 0.9)),
        );
    }
    for (name, v) in [
        ("request -> submitted stored", &mut submit),
        ("submitted -> assigned stored", &mut assign),
        ("assigned -> dispatch stored", &mut dispatch),
    ] {
        v.sort();
        println!(
            "  {name:<40} p50 {:>6.1} ms  p99 {:>6.1} ms  ({} tasks)",
            ms(percentile(v, 0.5)),
            ms(percentile(v, 0.99)),
            v.len()
        );
    }
}

/// Which member leads each stream the lifecycle writes, and which one the
/// main server's connection is on: a step whose leader is elsewhere crosses
/// a route both ways, so runs differ with where the elections fell.
async fn leaders(store: &ud_core::EventStore) {
    let on = store.client().server_info().server_name;
    let mut led = Vec::new();
    for name in [ud_schemas::streams::TASKS, edge::DISPATCH, edge::EDGE_IN] {
        if let Ok(mut s) = store.jetstream().get_stream(name).await {
            if let Ok(info) = s.info().await {
                let leader = info
                    .cluster
                    .as_ref()
                    .and_then(|c| c.leader.clone())
                    .unwrap_or_default();
                led.push(format!("{name} {leader}"));
            }
        }
    }
    println!("  main connection on {on}; leaders: {}", led.join(", "));
}

/// Messages stored so far in every stream of the hub.
async fn hub_messages(js: &async_nats::jetstream::Context) -> u64 {
    use futures::TryStreamExt;
    let Ok(names) = js.stream_names().try_collect::<Vec<String>>().await else {
        return 0;
    };
    let mut total = 0;
    for name in names {
        if let Ok(mut s) = js.get_stream(&name).await {
            if let Ok(info) = s.info().await {
                total += info.state.last_sequence;
            }
        }
    }
    total
}

/// Small writes each followed by a data sync, for `window`, in the
/// temporary directory (where the benchmark's servers keep their stores).
fn disk_syncs_per_second(window: Duration) -> Result<f64> {
    use std::io::Write;
    let dir = tempfile::tempdir()?;
    let mut f = std::fs::File::create(dir.path().join("sync-probe"))?;
    let (start, mut n) = (Instant::now(), 0u64);
    while start.elapsed() < window {
        f.write_all(&[0u8; 256])?;
        f.sync_data()?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

pub async fn run(a: Args) -> Result<()> {
    println!(
        "UniDesk lifecycle benchmark: REST, scheduler, JetStream, {} simulated nodes on leaf servers, PostgreSQL",
        a.nodes
    );
    let modes: &[bool] = match a.sync.as_deref() {
        Some("always") => &[true],
        Some("default") => &[false],
        None => &[true, false],
        Some(other) => {
            return Err(anyhow!(
                "--sync: unknown mode {other:?}; use always or default"
            ))
        }
    };
    let baseline = crate::baseline::celery(a.baseline_tasks).await?;
    for &sync_always in modes {
        one_mode(&a, sync_always, baseline).await?;
    }
    Ok(())
}
