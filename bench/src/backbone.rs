//! The backbone benchmark of the event-backbone issue.

use std::collections::BTreeMap;
use std::future::IntoFuture;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use ud_core::{EventStore, Expect};
use ud_projections::{rebuild, Db, Projector, ProjectorOptions};
use ud_schemas::codec::EventMeta;
use ud_schemas::events::*;
use ud_schemas::{streams, Event, NodeId, TaskId};
use ud_testkit::{NatsOptions, NatsServer, PgDatabase};

use crate::stats::{line, ms, percentile, rate};

#[derive(clap::Args)]
pub struct Args {
    /// Events for the publish, append and projection measurements.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Events replayed into an empty database.
    #[arg(long, default_value_t = 1_000_000)]
    replay_events: usize,
    /// Publishes in flight at once.
    #[arg(long, default_value_t = 512)]
    window: usize,
    /// Offered load for the projection-lag measurement, events per second.
    #[arg(long, default_value_t = 20_000)]
    lag_rate: usize,
    /// Seconds of each paced measurement.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Offered REST submissions per second.
    #[arg(long, default_value_t = 500)]
    rest_rate: usize,
    /// Measure only these parts (all when none is named).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Part>,
}

/// The parts of the backbone benchmark, in the order they run.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// Raw publishes and appends, each sync mode.
    Appends,
    /// The COPY ceiling and the live projection rate.
    Projection,
    /// Projection lag under a paced load.
    Lag,
    /// REST submit-to-projected.
    Rest,
    /// Replay into an empty schema.
    Replay,
}

impl Args {
    fn runs(&self, part: Part) -> bool {
        self.only.is_empty() || self.only.contains(&part)
    }
}

pub(crate) fn spec() -> ud_schemas::TaskSpec {
    ud_schemas::TaskSpec {
        name: Some("bench".into()),
        code_repo_url: "https://git.example.org/lab/code.git".into(),
        code_commit_id: "0123456789abcdef0123456789abcdef01234567".into(),
        env_repo_url: "https://git.example.org/lab/env.git".into(),
        env_commit_id: "89abcdef0123456789abcdef0123456789abcdef".into(),
        dockerfile_path: "Dockerfile".into(),
        command: vec!["python".into(), "train.py".into()],
        args: vec![],
        env: BTreeMap::new(),
        resources: ud_schemas::Resources {
            cpu_millis: 1000,
            memory_mb: 1024,
            gpus: 0,
            gpu_model: None,
            labels: BTreeMap::new(),
            preferred_labels: BTreeMap::new(),
            disk_mb: 0,
            gpu_memory_mb: 0,
            gpu_compute_capability: None,
            gpu_driver: None,
            gpu_shared: false,
            network: Default::default(),
            preferred_nodes: Vec::new(),
        },
        timeout_seconds: 3600,
        retry: ud_schemas::RetryPolicy {
            max_attempts: 1,
            backoff_seconds: 0,
            exit_codes: vec![],
            on_timeout: false,
        },
        priority: 0,
        queue: "default".into(),
        inputs: vec![],
        outputs: vec![],
        shm_size_mb: None,
        secrets: vec![],
        checkpoint: None,
        lost_after_seconds: None,
        after: vec![],
        shared: None,
        store: None,
        ports: vec![],
        session: None,
        image: None,
    }
}

fn submitted(id: TaskId) -> Event {
    Event::Task(
        id,
        TaskEvent::Submitted(TaskSubmitted {
            at: ud_schemas::now_millis(),
            project: ud_schemas::ProjectId::parse("bench").unwrap_or_else(|_| unreachable!()),
            spec: spec(),
            idempotency_key: None,
        }),
    )
}

/// Whole task lifecycles: `n` events, four per task.
pub(crate) fn lifecycles(n: usize) -> Vec<Event> {
    let node = NodeId::new();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let id = TaskId::new();
        let at = ud_schemas::now_millis();
        out.push(submitted(id));
        out.push(Event::Task(
            id,
            TaskEvent::Assigned(TaskAssigned {
                at,
                node_id: node,
                attempt: 1,
                gpus: vec![],
            }),
        ));
        out.push(Event::Task(
            id,
            TaskEvent::Started(TaskStarted {
                at,
                node_id: node,
                attempt: 1,
            }),
        ));
        out.push(Event::Task(
            id,
            TaskEvent::Succeeded(TaskSucceeded { at, exit_code: 0 }),
        ));
    }
    out.truncate(n);
    out
}

async fn server(sync_always: bool) -> Result<(NatsServer, EventStore)> {
    let nats = NatsServer::start_with(NatsOptions {
        sync_always,
        ..Default::default()
    })
    .await?;
    let store = EventStore::new(nats.connect().await?, None);
    store.ensure_streams(1).await?;
    Ok((nats, store))
}

/// Raw ceiling: plain acked publishes of an event-sized payload, `window` in flight.
async fn raw_publish(store: &EventStore, n: usize, window: usize) -> Result<f64> {
    let js = store.jetstream();
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "RAW".into(),
        subjects: vec!["raw.>".into()],
        ..Default::default()
    })
    .await?;
    let payload = Bytes::from(ud_schemas::encode_event(&submitted(TaskId::new()))?);
    let start = Instant::now();
    let mut inflight = FuturesUnordered::new();
    for i in 0..n {
        if inflight.len() >= window {
            if let Some(r) = inflight.next().await {
                r?;
            }
        }
        inflight.push(
            js.publish(format!("raw.{}", i % 4096), payload.clone())
                .await?
                .into_future(),
        );
    }
    while let Some(r) = inflight.next().await {
        r?;
    }
    Ok(rate(n, start.elapsed()))
}

/// Platform appends: full events with headers and a concurrency check each.
async fn appends(
    store: &EventStore,
    events: &[Event],
    window: usize,
    expect: Expect,
) -> Result<f64> {
    let batch = events
        .iter()
        .map(|e| (e.clone(), EventMeta::new("bench"), expect))
        .collect();
    let start = Instant::now();
    for r in store.append_pipelined(batch, window).await {
        r?;
    }
    Ok(rate(events.len(), start.elapsed()))
}

pub(crate) async fn write_fast(store: &EventStore, events: &[Event], window: usize) -> Result<()> {
    appends(store, events, window, Expect::Any)
        .await
        .map(|_| ())
}

/// Ceiling: PostgreSQL binary COPY of task-sized rows.
async fn pg_copy(pg: &PgDatabase, n: usize) -> Result<f64> {
    let client = pg.connect().await?;
    client.batch_execute("CREATE TABLE copy_ceiling (id uuid PRIMARY KEY, project text, state text, spec jsonb, version bigint)").await?;
    let spec = serde_json::to_value(spec())?;
    let start = Instant::now();
    let sink = client
        .copy_in("COPY copy_ceiling FROM STDIN BINARY")
        .await?;
    let writer = BinaryCopyInWriter::new(
        sink,
        &[Type::UUID, Type::TEXT, Type::TEXT, Type::JSONB, Type::INT8],
    );
    futures::pin_mut!(writer);
    for i in 0..n {
        writer
            .as_mut()
            .write(&[
                &uuid::Uuid::now_v7(),
                &"bench",
                &"succeeded",
                &spec,
                &(i as i64),
            ])
            .await?;
    }
    writer.finish().await?;
    Ok(rate(n, start.elapsed()))
}

async fn last_seq(store: &EventStore, stream: &str) -> Result<u64> {
    Ok(store
        .jetstream()
        .get_stream(stream)
        .await?
        .info()
        .await?
        .state
        .last_sequence)
}

/// Offered load at `per_sec` for `secs` while a live projector runs; lag
/// from each tick's publish ack to the projector's commit notice covering it.
async fn projection_lag(
    store: &EventStore,
    db: &Db,
    per_sec: usize,
    secs: u64,
    window: usize,
) -> Result<(f64, Duration, Duration)> {
    let mut notices = store
        .client()
        .subscribe(ud_schemas::subjects::projected(streams::TASKS))
        .await?;
    let seen: std::sync::Arc<std::sync::Mutex<Vec<(u64, Instant)>>> = Default::default();
    let sink = seen.clone();
    let (projected_tx, mut projected) = tokio::sync::watch::channel(0u64);
    let collector = tokio::spawn(async move {
        while let Some(m) = notices.next().await {
            if let Some(seq) = std::str::from_utf8(&m.payload)
                .ok()
                .and_then(|s| s.parse().ok())
            {
                if let Ok(mut v) = sink.lock() {
                    v.push((seq, Instant::now()));
                }
                let _ = projected_tx.send(seq);
            }
        }
    });
    let projector = Projector::new(
        db.clone(),
        store.jetstream().clone(),
        streams::TASKS,
        ProjectorOptions::default(),
    );
    let live = tokio::spawn(async move { projector.run(None).await });
    let tick = Duration::from_millis(10);
    let per_tick = (per_sec as u64 * tick.as_millis() as u64 / 1000).max(1) as usize;
    let ticks = secs * 1000 / tick.as_millis() as u64;
    let events = lifecycles(per_tick * ticks as usize);
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut marks: Vec<(u64, Instant)> = Vec::new();
    let start = Instant::now();
    for chunk in events.chunks(per_tick) {
        interval.tick().await;
        let sent = Instant::now();
        let batch = chunk
            .iter()
            .map(|e| (e.clone(), EventMeta::new("bench"), Expect::Any))
            .collect();
        let mut max = 0;
        for r in store.append_pipelined(batch, window).await {
            max = max.max(r?);
        }
        // Lag runs from when the tick's first event was sent.
        marks.push((max, sent));
    }
    let offered = rate(events.len(), start.elapsed());
    let last = marks.last().map_or(0, |m| m.0);
    // Wait for the projector to cover the last event.
    let _ = tokio::time::timeout(
        Duration::from_secs(60),
        projected.wait_for(|seq| *seq >= last),
    )
    .await;
    live.abort();
    collector.abort();
    let seen = seen.lock().map(|v| v.clone()).unwrap_or_default();
    Ok(lags(offered, &marks, &seen))
}

fn lags(
    offered: f64,
    marks: &[(u64, Instant)],
    seen: &[(u64, Instant)],
) -> (f64, Duration, Duration) {
    let mut lags: Vec<Duration> = marks
        .iter()
        .filter_map(|(seq, at)| {
            seen.iter()
                .find(|(s, _)| s >= seq)
                .map(|(_, t)| t.saturating_duration_since(*at))
        })
        .collect();
    lags.sort();
    (offered, percentile(&lags, 0.5), percentile(&lags, 0.99))
}

async fn rest_submit_to_projected(
    store: &EventStore,
    nats_url: String,
    pg: &PgDatabase,
    per_sec: usize,
    secs: u64,
) -> Result<(f64, Duration, Duration, usize)> {
    let running =
        ud_server::start(ud_server::ServerConfig::local(nats_url, pg.url.clone())).await?;
    let issued = ud_core::commands::issue_token(
        store,
        &ud_core::commands::NewToken::scoped("bench", &["bench".into()], false),
        "bench",
    )
    .await
    .map_err(|e| anyhow!("{e}"))?;
    running
        .state
        .projected
        .wait(streams::AUTH, issued.seq, Duration::from_secs(10))
        .await;
    let url = format!("http://{}/api/v1/tasks?wait=projected", running.addr);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let body = serde_json::json!({
        "project": "bench", "code_repo_url": "https://git.example.org/c.git",
        "code_commit_id": "0123456789abcdef0123456789abcdef01234567",
        "env_repo_url": "https://git.example.org/e.git", "env_commit_id": "0123456789abcdef0123456789abcdef01234567",
        "dockerfile_path": "Dockerfile", "command": ["true"]
    });
    let n = per_sec * secs as usize;
    let gap = Duration::from_secs_f64(1.0 / per_sec as f64);
    let start = Instant::now();
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        tokio::time::sleep_until((start + gap * i as u32).into()).await;
        let (http, url, body, token) = (
            http.clone(),
            url.clone(),
            body.clone(),
            issued.secret.clone(),
        );
        handles.push(tokio::spawn(async move {
            let t = Instant::now();
            let resp = http
                .post(&url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .ok()?;
            let v: serde_json::Value = resp.json().await.ok()?;
            (v["projected"] == true).then(|| t.elapsed())
        }));
    }
    let mut lat = Vec::with_capacity(n);
    let mut failed = 0;
    for h in handles {
        match h.await.ok().flatten() {
            Some(d) => lat.push(d),
            None => failed += 1,
        }
    }
    let offered = rate(n, start.elapsed());
    running.shutdown();
    lat.sort();
    Ok((
        offered,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        failed,
    ))
}

pub async fn run(a: Args) -> Result<()> {
    println!(
        "UniDesk backbone benchmark: {} events, window {}, replay {} events",
        a.events, a.window, a.replay_events
    );
    println!("nats-server with JetStream (sync_interval always and default), PostgreSQL from UD_TEST_DATABASE_URL");
    println!();

    // Ceilings and appends, with every write synced and with the default sync.
    let mut results = Vec::new();
    let modes: &[bool] = if a.runs(Part::Appends) {
        &[true, false]
    } else {
        &[]
    };
    for &sync_always in modes {
        let (_nats, store) = server(sync_always).await?;
        let raw = raw_publish(&store, a.events, a.window).await?;
        let events: Vec<Event> = (0..a.events).map(|_| submitted(TaskId::new())).collect();
        let checked = appends(&store, &events, a.window, Expect::New).await?;
        let events: Vec<Event> = (0..a.events).map(|_| submitted(TaskId::new())).collect();
        let unchecked = appends(&store, &events, a.window, Expect::Any).await?;
        results.push((sync_always, raw, checked, unchecked));
    }
    for (sync_always, raw, checked, unchecked) in &results {
        let mode = if *sync_always {
            "sync always"
        } else {
            "default sync"
        };
        line(
            &format!("ceiling: raw acked publishes/s ({mode})"),
            *raw,
            "msg/s",
            None,
        );
        line(
            &format!("appends with concurrency check/s ({mode})"),
            *checked,
            "ev/s",
            Some((*raw, "raw ceiling")),
        );
        line(
            &format!("appends, headers but no check/s ({mode})"),
            *unchecked,
            "ev/s",
            Some((*raw, "raw ceiling")),
        );
    }

    // PostgreSQL ceiling (the projection and the replay are judged against
    // it) and projection throughput.
    let pg = PgDatabase::create().await?;
    let copy = pg_copy(&pg, a.events).await?;
    line(
        "ceiling: PostgreSQL binary COPY rows/s",
        copy,
        "rows/s",
        None,
    );
    if a.runs(Part::Projection) {
        projection(&a, &pg, copy).await?;
    }
    if a.runs(Part::Lag) {
        lag(&a, &pg).await?;
    }
    if a.runs(Part::Rest) {
        rest(&a).await?;
    }
    if a.runs(Part::Replay) {
        replay(&a, &pg, copy).await?;
    }
    Ok(())
}

async fn projection(a: &Args, pg: &PgDatabase, copy: f64) -> Result<()> {
    let (_nats, store) = server(false).await?;
    write_fast(&store, &lifecycles(a.events), a.window).await?;
    let db = Db::connect(&pg.url, "proj", 8).await?;
    db.migrate().await?;
    let last = last_seq(&store, streams::TASKS).await?;
    let start = Instant::now();
    Projector::new(
        db.clone(),
        store.jetstream().clone(),
        streams::TASKS,
        ProjectorOptions {
            batch_max: 5000,
            notify: false,
            ..Default::default()
        },
    )
    .run(Some(last))
    .await?;
    let projected = rate(a.events, start.elapsed());
    line(
        "events projected/s (4 events per task, coalesced)",
        projected,
        "ev/s",
        Some((copy, "COPY rows/s")),
    );
    Ok(())
}

/// Projection lag under load.
async fn lag(a: &Args, pg: &PgDatabase) -> Result<()> {
    let (_nats, store) = server(false).await?;
    let db = Db::connect(&pg.url, "lag", 8).await?;
    db.migrate().await?;
    let (offered, p50, p99) = projection_lag(&store, &db, a.lag_rate, a.seconds, a.window).await?;
    line("projection lag: offered load", offered, "ev/s", None);
    line("projection lag p50", ms(p50), "ms", None);
    line(
        "projection lag p99 (target < 200 ms at 20k ev/s)",
        ms(p99),
        "ms",
        None,
    );
    Ok(())
}

/// REST submit-to-projected, hub syncing every write.
async fn rest(a: &Args) -> Result<()> {
    let (nats, store) = server(true).await?;
    let rest_pg = PgDatabase::create().await?;
    let (offered, p50, p99, failed) =
        rest_submit_to_projected(&store, nats.url(), &rest_pg, a.rest_rate, a.seconds).await?;
    line("REST submit-to-projected: offered", offered, "req/s", None);
    line("REST submit-to-projected p50", ms(p50), "ms", None);
    line(
        "REST submit-to-projected p99 (target < 50 ms at 500/s)",
        ms(p99),
        "ms",
        None,
    );
    line(
        "REST submissions not projected or failed",
        failed as f64,
        "",
        None,
    );
    Ok(())
}

/// Replay of a million events into an empty database.
async fn replay(a: &Args, pg: &PgDatabase, copy: f64) -> Result<()> {
    let (_nats, store) = server(false).await?;
    write_fast(&store, &lifecycles(a.replay_events), a.window).await?;
    let db = Db::connect(&pg.url, "replay", 8).await?;
    let start = Instant::now();
    let replayed = rebuild::rebuild(&db, store.jetstream(), 5000).await?;
    let took = start.elapsed();
    let (read, write) = replayed.iter().fold((0.0, 0.0), |(r, w), s| {
        (r + s.read_seconds, w + s.write_seconds)
    });
    line("replay: reading, decoding and folding", read, "s", None);
    line("replay: writing the rows", write, "s", None);
    line(
        &format!("replay of {} events into an empty schema", a.replay_events),
        took.as_secs_f64(),
        "s",
        None,
    );
    line(
        "replay rate",
        rate(a.replay_events, took),
        "ev/s",
        Some((copy, "COPY rows/s")),
    );
    Ok(())
}
