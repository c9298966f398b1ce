//! The main server on a three-server JetStream cluster with replicated
//! streams (R3): one server is killed with SIGKILL under a steady load of
//! submissions and node heartbeats; no acknowledged task or heartbeat is
//! lost, the API keeps serving, and the read models equal a replay of the
//! streams.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use reqwest::StatusCode;
use serde_json::Value;
use ud_core::store::Expect;
use ud_projections::{rebuild, Db};
use ud_schemas::codec::EventMeta;
use ud_schemas::events::{NodeHeartbeat, NodeRegistered};
use ud_schemas::{now_millis, streams, Event, NodeEvent, NodeResources};
use ud_server::{self as server, ServerConfig};
use ud_testkit::{NatsServer, PgDatabase};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_loses_a_server_loses_no_acknowledged_task() -> Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("UD_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
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
    for name in [streams::TASKS, streams::NODES, streams::AUTH] {
        let info = store
            .jetstream()
            .get_stream(name)
            .await?
            .info()
            .await?
            .clone();
        assert_eq!(info.config.num_replicas, 3, "{name}");
    }
    let issued = ud_core::commands::issue_token(
        &store,
        &ud_core::commands::NewToken::scoped("admin", &[], true),
        "test",
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert!(
        running
            .state
            .projected
            .wait(streams::AUTH, issued.seq, Duration::from_secs(10))
            .await
    );
    let (http, base) = (reqwest::Client::new(), format!("http://{}", running.addr));

    // Five nodes, heartbeating as the main server's ingest records them.
    let nodes: Vec<ud_schemas::NodeId> = (0..5).map(|_| ud_schemas::NodeId::new()).collect();
    for (i, node) in nodes.iter().enumerate() {
        let registered = Event::Node(
            *node,
            NodeEvent::Registered(NodeRegistered {
                at: now_millis(),
                name: format!("n{i}"),
                labels: Default::default(),
                resources: NodeResources {
                    cpu_millis: 8000,
                    memory_mb: 16384,
                    os: "linux".into(),
                    agent_version: "test".into(),
                    ..Default::default()
                },
            }),
        );
        store
            .append(&registered, &EventMeta::new("node"), Expect::New)
            .await?;
    }
    let mut beats: Vec<(ud_schemas::NodeId, u64)> = Vec::new();
    let mut beats_refused = 0;

    // A steady load: one submission every 20 ms and a heartbeat every 100 ms
    // for 12 s; n1 dies after 2 s.
    let mut acked: Vec<(String, Instant)> = Vec::new();
    let mut refused = 0;
    let start = Instant::now();
    let mut killed_at = None;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while start.elapsed() < Duration::from_secs(12) {
        tick.tick().await;
        if killed_at.is_none() && start.elapsed() > Duration::from_secs(2) {
            nats[0].kill().await?;
            killed_at = Some(Instant::now());
        }
        let n = acked.len() + refused;
        if n.is_multiple_of(5) {
            let node = nodes[(n / 5) % nodes.len()];
            let beat = Event::Node(
                node,
                NodeEvent::Heartbeat(NodeHeartbeat {
                    at: now_millis(),
                    running_tasks: 0,
                    disk_free_mb: Some(1 << 20),
                    low_disk: false,
                    gpus: None,
                }),
            );
            match store
                .append(&beat, &EventMeta::new("node"), Expect::Any)
                .await
            {
                Ok(seq) => beats.push((node, seq)),
                Err(_) => beats_refused += 1,
            }
        }
        let resp = http
            .post(format!("{base}/api/v1/tasks"))
            .bearer_auth(&issued.secret)
            .json(&crate::common::task("lab"))
            .send()
            .await;
        match resp {
            Ok(r) if r.status() == StatusCode::ACCEPTED => {
                let v: Value = r.json().await?;
                acked.push((
                    v["task_id"].as_str().unwrap_or_default().to_owned(),
                    Instant::now(),
                ));
            }
            _ => refused += 1,
        }
    }
    let killed_at = killed_at.unwrap_or(start);
    let after = acked.iter().filter(|(_, at)| *at > killed_at).count();
    let gap = acked
        .windows(2)
        .map(|w| w[1].1 - w[0].1)
        .max()
        .unwrap_or_default();
    println!("acknowledged {} submissions ({after} after the kill), {refused} refused; longest gap between acknowledgements {gap:?}", acked.len());
    ensure!(after > 0, "nothing was acknowledged after the kill");

    // Every acknowledged heartbeat is in its stream.
    println!(
        "{} heartbeats acknowledged, {beats_refused} refused",
        beats.len()
    );
    ensure!(
        beats.iter().any(|(_, seq)| *seq > 0),
        "no heartbeat acknowledged"
    );
    for node in &nodes {
        let stored: std::collections::HashSet<u64> = store
            .read_subject(streams::HEARTBEATS, &format!("ud.node.{node}.heartbeat"))
            .await?
            .iter()
            .map(|e| e.seq)
            .collect();
        for (_, seq) in beats.iter().filter(|(n, _)| n == node) {
            ensure!(
                stored.contains(seq),
                "acknowledged heartbeat {seq} of {node} is lost"
            );
        }
    }

    // Every acknowledged task is in the stream and, once projected, in the read model.
    for (id, _) in &acked {
        let task: ud_schemas::TaskId = id.parse()?;
        ensure!(
            store.load_task(&task).await?.is_some(),
            "acknowledged task {id} is not in the stream"
        );
    }
    let last = store
        .jetstream()
        .get_stream(streams::TASKS)
        .await?
        .info()
        .await?
        .state
        .last_sequence;
    assert!(
        running
            .state
            .projected
            .wait(streams::TASKS, last, Duration::from_secs(30))
            .await
    );
    if let Some((_, last_beat)) = beats.last() {
        assert!(
            running
                .state
                .projected
                .wait(streams::HEARTBEATS, *last_beat, Duration::from_secs(30))
                .await
        );
    }
    for (id, _) in &acked {
        let r = http
            .get(format!("{base}/api/v1/tasks/{id}"))
            .bearer_auth(&issued.secret)
            .send()
            .await?;
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "task {id} missing from the read model"
        );
    }

    // The read models equal a replay of the streams.
    let replay = Db::connect(&pg.url, "replay", 4).await?;
    rebuild::rebuild(&replay, store.jetstream(), 5000).await?;
    let live = Db::connect(&pg.url, "public", 4).await?;
    let diffs = rebuild::compare(&live, "replay", "public").await?;
    let differing: Vec<_> = diffs
        .iter()
        .filter(|d| d.only_in_left + d.only_in_right > 0)
        .map(|d| d.table.clone())
        .collect();
    assert!(
        differing.is_empty(),
        "read models differ from the replay in {differing:?}"
    );
    running.shutdown();
    Ok(())
}
