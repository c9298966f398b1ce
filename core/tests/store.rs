//! The event store and command handling against a real nats-server.

use std::collections::BTreeMap;

use anyhow::Result;
use ud_core::commands::CommandError;
use ud_core::task::TaskCommand;
use ud_core::validate::{ResourceRequest, SubmitTask};
use ud_core::{EventStore, Expect, StoreError, TaskCommands};
use ud_schemas::codec::EventMeta;
use ud_schemas::events::*;
use ud_schemas::{streams, subjects, Event, NodeId, TaskId};
use ud_testkit::NatsServer;

pub fn request(project: &str) -> SubmitTask {
    SubmitTask {
        project: project.into(),
        name: Some("t".into()),
        code_repo_url: "https://example.org/code.git".into(),
        code_commit_id: "a".repeat(40),
        env_repo_url: "https://example.org/env.git".into(),
        env_commit_id: "b".repeat(40),
        dockerfile_path: "Dockerfile".into(),
        command: vec!["true".into()],
        args: vec![],
        env: BTreeMap::new(),
        resources: ResourceRequest::default(),
        timeout_seconds: Some(60),
        retry: None,
        priority: None,
        queue: None,
        inputs: vec![],
        outputs: vec![],
        network: None,
        shm_size_mb: None,
        secrets: vec![],
        checkpoint: None,
        lost_after_seconds: None,
        after: vec![],
        store: None,
        ports: vec![],
        session: None,
        image: None,
    }
}

async fn setup() -> Result<(NatsServer, TaskCommands)> {
    let nats = NatsServer::start().await?;
    let store = EventStore::new(nats.connect().await?, None);
    store.ensure_streams(1).await?;
    let commands = TaskCommands::new(store).await?;
    Ok((nats, commands))
}

async fn stream_len(store: &EventStore, name: &str) -> Result<u64> {
    Ok(store
        .jetstream()
        .get_stream(name)
        .await?
        .info()
        .await?
        .state
        .messages)
}

#[tokio::test]
async fn concurrency_check_covers_every_subject_of_the_aggregate() -> Result<()> {
    let (_nats, commands) = setup().await?;
    let store = commands.store();
    let id = TaskId::new();
    let node = NodeId::new();
    let meta = EventMeta::new("test");
    let submitted = Event::Task(
        id,
        TaskEvent::Submitted(TaskSubmitted {
            at: 1,
            project: "lab".parse()?,
            spec: ud_core::validate::submit_task(&request("lab"))
                .map_err(|e| anyhow::anyhow!("{e:?}"))?
                .1,
            idempotency_key: None,
        }),
    );
    let s1 = store.append(&submitted, &meta, Expect::New).await?;
    // A second "first" event of the same task is refused.
    assert!(matches!(
        store.append(&submitted, &meta.next(), Expect::New).await,
        Err(StoreError::Conflict)
    ));
    let assigned = Event::Task(
        id,
        TaskEvent::Assigned(TaskAssigned {
            at: 2,
            node_id: node,
            attempt: 1,
            gpus: vec![],
        }),
    );
    // Expecting s1 on a different subject of the same task works: the scope is ud.task.<id>.>
    let s2 = store
        .append(&assigned, &meta.next(), Expect::LastSeq(s1))
        .await?;
    // A stale expectation is refused.
    let started = Event::Task(
        id,
        TaskEvent::Started(TaskStarted {
            at: 3,
            node_id: node,
            attempt: 1,
        }),
    );
    assert!(matches!(
        store
            .append(&started, &meta.next(), Expect::LastSeq(s1))
            .await,
        Err(StoreError::Conflict)
    ));
    store
        .append(&started, &meta.next(), Expect::LastSeq(s2))
        .await?;
    // Another task's events do not interfere.
    let other = Event::Task(
        TaskId::new(),
        match &submitted {
            Event::Task(_, e) => e.clone(),
            _ => unreachable!(),
        },
    );
    store.append(&other, &meta.next(), Expect::New).await?;
    let (task, last) = store
        .load_task(&id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("task missing"))?;
    assert_eq!(task.state.name(), "running");
    assert_eq!(task.version, 3);
    assert!(last > s2);
    assert_eq!(stream_len(store, streams::TASKS).await?, 4);
    Ok(())
}

#[tokio::test]
async fn of_concurrent_conflicting_commands_exactly_one_wins() -> Result<()> {
    let (_nats, commands) = setup().await?;
    for _round in 0..5 {
        let accepted = commands
            .submit(&request("lab"), None, "test", |_| true)
            .await?;
        let id = accepted.task_id;
        let node_a = NodeId::new();
        let node_b = NodeId::new();
        // Two schedulers assign the same pending task at once, plus a cancel.
        let cmds = [
            TaskCommand::Assign {
                node_id: node_a,
                gpus: vec![],
            },
            TaskCommand::Assign {
                node_id: node_b,
                gpus: vec![],
            },
            TaskCommand::Cancel {
                reason: "race".into(),
            },
            TaskCommand::Assign {
                node_id: node_a,
                gpus: vec![],
            },
        ];
        let results = futures::future::join_all(cmds.into_iter().map(|c| {
            let commands = commands.clone();
            async move { commands.execute(id, c, "racer", |_| true).await }
        }))
        .await;
        // Losers read the task again and decide again: a second assignment
        // is refused; the cancel still applies to whatever state won.
        let assigned = [0, 1, 3].iter().filter(|i| results[**i].is_ok()).count();
        assert!(assigned <= 1, "{results:?}");
        for r in &results {
            assert!(
                matches!(
                    r,
                    Ok(_) | Err(CommandError::Conflict) | Err(CommandError::Rejected(_))
                ),
                "{r:?}"
            );
        }
        let history = commands
            .store()
            .read_subject(streams::TASKS, &subjects::task_all(&id))
            .await?;
        let types: Vec<&str> = history
            .iter()
            .map(|e| match &e.envelope.event {
                ud_schemas::Event::Task(_, t) => t.name(),
                _ => "other",
            })
            .collect();
        assert_eq!(
            types.iter().filter(|t| **t == "assigned").count(),
            assigned,
            "{types:?}"
        );
        assert_eq!(
            history.len(),
            1 + results.iter().filter(|r| r.is_ok()).count(),
            "one event per accepted command: {types:?}"
        );
        assert!(
            types
                .iter()
                .any(|t| matches!(*t, "cancelled" | "cancel_requested"))
                == results[2].is_ok()
        );
    }
    Ok(())
}

#[tokio::test]
async fn idempotency_key_returns_the_first_task_and_appends_nothing() -> Result<()> {
    let (_nats, commands) = setup().await?;
    let first = commands
        .submit(&request("lab"), Some("key-1"), "test", |_| true)
        .await?;
    let again = commands
        .submit(&request("lab"), Some("key-1"), "test", |_| true)
        .await?;
    assert!(first.created);
    assert!(!again.created);
    assert_eq!(first.task_id, again.task_id);
    assert_eq!(first.seq, again.seq);
    assert_eq!(stream_len(commands.store(), streams::TASKS).await?, 1);
    // Same key in another project is another task.
    let other = commands
        .submit(&request("other"), Some("key-1"), "test", |_| true)
        .await?;
    assert_ne!(other.task_id, first.task_id);
    // Same key, different request: refused.
    let mut changed = request("lab");
    changed.command = vec!["false".into()];
    let err = commands
        .submit(&changed, Some("key-1"), "test", |_| true)
        .await;
    assert!(
        matches!(err, Err(CommandError::IdempotencyMismatch)),
        "{err:?}"
    );
    assert_eq!(stream_len(commands.store(), streams::TASKS).await?, 2);
    Ok(())
}

#[tokio::test]
async fn invalid_and_forbidden_submissions_append_nothing() -> Result<()> {
    let (_nats, commands) = setup().await?;
    let mut bad = request("lab");
    bad.code_commit_id = "main".into();
    match commands.submit(&bad, None, "test", |_| true).await {
        Err(CommandError::Invalid(fields)) => assert_eq!(fields[0].field, "code_commit_id"),
        other => panic!("expected invalid, got {other:?}"),
    }
    let forbidden = commands
        .submit(&request("lab"), None, "test", |p| p.as_str() == "mine")
        .await;
    assert!(matches!(forbidden, Err(CommandError::Forbidden(_))));
    let bad_key = commands
        .submit(&request("lab"), Some("has space"), "test", |_| true)
        .await;
    assert!(matches!(bad_key, Err(CommandError::Invalid(_))));
    assert_eq!(stream_len(commands.store(), streams::TASKS).await?, 0);
    Ok(())
}

#[tokio::test]
async fn commands_are_a_nats_micro_service() -> Result<()> {
    let (nats, commands) = setup().await?;
    let client = nats.connect().await?;
    tokio::spawn(ud_core::service::run(client.clone(), commands.clone()));
    // Discovery, as `nats micro ls` does it.
    // The service may not be subscribed yet: "no responders" comes back at once until it is.
    let info = loop {
        match client.request("$SRV.INFO.unidesk-tasks", "".into()).await {
            Ok(m) => break serde_json::from_slice::<serde_json::Value>(&m.payload)?,
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                tokio::task::yield_now().await
            }
            Err(e) => return Err(e.into()),
        }
    };
    assert_eq!(info["name"], "unidesk-tasks");
    let endpoints: Vec<String> = info["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["subject"].as_str().map(str::to_owned))
        .collect();
    assert!(
        endpoints.contains(&"ud.cmd.task.submit".to_owned()),
        "{endpoints:?}"
    );
    assert!(endpoints.contains(&"ud.cmd.task.cancel".to_owned()));

    let body = serde_json::json!({"task": request("lab"), "idempotency_key": "nats-1", "actor": "integration"});
    let reply = client
        .request("ud.cmd.task.submit", serde_json::to_vec(&body)?.into())
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&reply.payload)?;
    let id: TaskId = v["task_id"].as_str().unwrap_or_default().parse()?;
    let (task, _) = commands
        .store()
        .load_task(&id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("not stored"))?;
    assert_eq!(task.project.as_str(), "lab");

    let bad = serde_json::json!({"task": {"project": "lab"}});
    let reply = client
        .request("ud.cmd.task.submit", serde_json::to_vec(&bad)?.into())
        .await?;
    let headers = reply
        .headers
        .ok_or_else(|| anyhow::anyhow!("no error headers"))?;
    assert_eq!(
        headers.get("Nats-Service-Error-Code").map(|v| v.as_str()),
        Some("400")
    );

    let cancel = serde_json::json!({"task_id": id.to_string(), "reason": "done"});
    let reply = client
        .request("ud.cmd.task.cancel", serde_json::to_vec(&cancel)?.into())
        .await?;
    assert!(reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Service-Error-Code"))
        .is_none());
    let (task, _) = commands
        .store()
        .load_task(&id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("not stored"))?;
    assert_eq!(task.state.name(), "cancelled");
    Ok(())
}

/// A main server whose view lags behind the stored heartbeats (after a
/// restart of the hub or of itself, under a burst) marks offline only the
/// nodes its last stored heartbeat shows silent, naming that heartbeat.
#[tokio::test]
async fn liveness_judges_on_the_last_stored_heartbeat() -> Result<()> {
    use ud_core::aggregate::{Repository, Retries};
    use ud_core::edge::liveness;
    use ud_core::edge::view::{Cluster, NodeEntry};
    use ud_core::node::{Node, NodeCommand};

    let nats = NatsServer::start().await?;
    let store = EventStore::new(nats.connect().await?, None);
    store.ensure_streams(1).await?;
    let nodes: Repository<Node> = Repository::new(store.clone());
    let now = ud_schemas::now_millis();
    let beat = |at| NodeCommand::Heartbeat {
        at,
        running_tasks: 0,
        disk_free_mb: None,
        low_disk: false,
        gpus: None,
    };
    let mut cluster = Cluster::default();
    // Two nodes the view last heard 20 s ago; since then one was heard 1 s
    // ago and the other 8 s ago, stored but not yet in the view (whose
    // registration, just now, would count as heard).
    let mut ids = Vec::new();
    for (name, heard) in [("heard", now - 1_000), ("silent", now - 8_000)] {
        let id = NodeId::new();
        let enroll = NodeCommand::Enroll {
            name: name.into(),
            labels: BTreeMap::new(),
            secret_hash: "h".into(),
        };
        nodes.create(id, enroll, &EventMeta::new("test")).await?;
        let register = NodeCommand::Register {
            name: name.into(),
            labels: BTreeMap::new(),
            resources: ud_schemas::spec::NodeResources::default(),
        };
        let registered = nodes
            .execute(id, register, &EventMeta::new("test"), Retries(0), |_| true)
            .await?;
        // The view as it was 20 s ago (last heard then).
        let mut node = registered.state.expect("a registered node");
        node.last_seen = Some(now - 20_000);
        cluster.nodes.insert(
            id,
            NodeEntry {
                node,
                seq: registered.seq,
            },
        );
        nodes
            .execute(id, beat(heard), &EventMeta::new("test"), Retries(0), |_| {
                true
            })
            .await?;
        ids.push(id);
    }
    let before = stream_len(&store, streams::NODES).await?;

    assert_eq!(liveness::check(&nodes, &cluster, now, 5_000).await, 1);

    assert_eq!(stream_len(&store, streams::NODES).await?, before + 1);
    let (heard, _) = nodes.load(&ids[0]).await?.expect("heard node");
    assert_eq!(heard.offline_after, None, "a node heard 1 s ago is online");
    let (silent, _) = nodes.load(&ids[1]).await?.expect("silent node");
    assert_eq!(
        silent.offline_after,
        Some(now - 8_000),
        "the mark names the last stored heartbeat, not the view's"
    );
    Ok(())
}
