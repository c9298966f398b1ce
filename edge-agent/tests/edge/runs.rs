//! Runs across trouble: stale dispatches, agent restarts (adoption, time limits), two main servers.

use std::time::Duration;

use anyhow::{anyhow, Result};
use futures::StreamExt;
use serde_json::json;
use ud_schemas::edge;
use ud_server::{self as server, EdgeConfig, ServerConfig};

use crate::common::*;

#[tokio::test]
async fn a_dispatch_that_went_stale_while_the_node_was_away_is_never_run() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    let token = s.enroll("delta").await?;
    let link = ud_testkit::Relay::start(s.hub.leaf_port()).await?;
    let node = s
        .join_via("delta", token, Duration::from_millis(500), link.port())
        .await?;
    s.node_status(node.id, "online", JOIN).await?;
    link.cut();
    // Assigned while the node is away: the dispatch waits in its consumer.
    let task = s.submit("echo this-must-not-run", 120).await?;
    s.task_state(&task, &["assigned"], Duration::from_secs(30))
        .await?;
    // Meanwhile the assignment stops being current.
    s.post(
        &format!("/api/v1/tasks/{task}/cancel"),
        json!({"reason": "changed my mind"}),
    )
    .await?;
    s.task_state(&task, &["cancelling"], Duration::from_secs(30))
        .await?;
    link.restore();
    let done = s
        .task_state(
            &task,
            &["cancelled", "succeeded", "failed"],
            Duration::from_secs(60),
        )
        .await?;
    assert_eq!(done["state"], "cancelled", "{done}");
    let history = s.get(&format!("/api/v1/tasks/{task}/events")).await?;
    let types: Vec<&str> = history
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert_eq!(
        types,
        vec![
            "task.submitted",
            "task.assigned",
            "task.cancel_requested",
            "task.cancelled"
        ]
    );
    assert!(!logs(&s, &task).await?.contains("this-must-not-run"));
    // No container was ever made for it.
    let made = labelled_containers(ud_edge_agent::docker::LABEL_TASK, task, true).await?;
    assert!(
        made.is_empty(),
        "a container was made for a stale dispatch: {made:?}"
    );
    // The node goes on taking work.
    s.runs_ok("echo next", 60, Duration::from_secs(60)).await?;
    node.agent.abort();
    Ok(())
}

#[tokio::test]
async fn a_restarted_agent_adopts_its_running_container() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    let token = s.enroll("delta").await?;
    let node = s
        .join("delta", token.clone(), Duration::from_millis(500))
        .await?;
    s.node_status(node.id, "online", JOIN).await?;
    let task = s.submit("echo first; sleep 3; echo second", 120).await?;
    s.task_state(&task, &["running"], Duration::from_secs(60))
        .await?;
    // The agent dies; its container goes on.
    node.agent.abort();
    let _ = node.agent.await;
    let agent = spawn_agent(&node.leaf, &token, "delta", Duration::from_millis(500));
    let done = s
        .task_state(&task, &["succeeded", "failed"], Duration::from_secs(60))
        .await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    let history = s.get(&format!("/api/v1/tasks/{task}/events")).await?;
    let starts = history
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["type"] == "task.started")
        .count();
    assert_eq!(starts, 1, "the task was run twice");
    agent.abort();
    Ok(())
}

/// When each of a task's events of type `kind` was stored, in ms since the
/// epoch, from its history.
async fn stored_at(s: &Stack, task: &str, kind: &str) -> Result<Vec<i64>> {
    let history = s.get(&format!("/api/v1/tasks/{task}/events")).await?;
    Ok(history
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["type"] == kind)
        .filter_map(|e| e["data"]["at"].as_i64())
        .collect())
}

#[tokio::test]
async fn a_restarted_agent_keeps_the_time_limit_of_the_run_it_adopts() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    let token = s.enroll("echo").await?;
    let node = s
        .join("echo", token.clone(), Duration::from_millis(500))
        .await?;
    s.node_status(node.id, "online", JOIN).await?;
    // A run that stops at once when asked to (so that its end is its
    // limit), saying when on the machine's boot clock.
    let task = s
        .submit(
            "now() { cut -d' ' -f1 /proc/uptime; }; trap 'echo stopped $(now); exit 143' TERM; echo up $(now); sleep 60 & wait",
            6,
        )
        .await?;
    s.task_state(&task, &["running"], Duration::from_secs(60))
        .await?;
    // Killed and back 3 s later: the run goes on, its limit counted from its start.
    node.agent.abort();
    let _ = node.agent.await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let agent = spawn_agent(&node.leaf, &token, "echo", Duration::from_millis(500));
    let done = s
        .task_state(
            &task,
            &["succeeded", "failed", "timed_out"],
            Duration::from_secs(60),
        )
        .await?;
    assert_eq!(done["state"], "timed_out", "{done}");
    let started = stored_at(&s, &task, "task.started").await?;
    assert_eq!(started.len(), 1, "started once: {started:?}");
    // Stopped at its 6 s limit, not 6 s after the restart (9 s or more), as
    // the node's own clock saw it: the platform stamps events when it takes
    // them, later by however long they waited on the way.
    let out = logs(&s, &task).await?;
    let at = |word: &str| {
        out.split(word)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|t| t.parse::<f64>().ok())
    };
    // Each line once: the stopped agent's log follower went with it.
    assert_eq!(out.matches("stopped ").count(), 1, "{out:?}");
    // (The script's first line can come seconds after the container
    // started on a busy machine: the lower bound leaves room for that.)
    let (up, stopped) = (at("up "), at("stopped "));
    let ran = stopped.zip(up).map(|(b, a)| b - a);
    assert!(
        ran.is_some_and(|r| (2.5..8.5).contains(&r)),
        "stopped {ran:?} s after it started: {out:?}"
    );
    agent.abort();
    Ok(())
}

#[tokio::test]
async fn an_agent_back_after_a_runs_limit_stops_it_at_once_as_timed_out() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    let token = s.enroll("foxtrot").await?;
    let node = s
        .join("foxtrot", token.clone(), Duration::from_millis(500))
        .await?;
    s.node_status(node.id, "online", JOIN).await?;
    // One run goes on past its limit while the agent is away, one ends past it.
    let long = s.submit("sleep 60", 3).await?;
    let short = s.submit("sleep 5; echo done", 3).await?;
    for t in [&long, &short] {
        s.task_state(t, &["running"], Duration::from_secs(60))
            .await?;
    }
    node.agent.abort();
    let _ = node.agent.await;
    // The agent stays away past both limits, and past the short run's end.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let back = ud_schemas::now_millis();
    let agent = spawn_agent(&node.leaf, &token, "foxtrot", Duration::from_millis(500));
    for t in [&long, &short] {
        let done = s
            .task_state(
                t,
                &["succeeded", "failed", "timed_out"],
                Duration::from_secs(60),
            )
            .await?;
        assert_eq!(done["state"], "timed_out", "{done}");
    }
    let ended = stored_at(&s, &long, "task.timed_out").await?;
    let after = ended.first().copied().unwrap_or(i64::MAX) - back;
    assert!(
        after < 15_000,
        "stopped {after} ms after the agent came back"
    );
    agent.abort();
    Ok(())
}

/// Whether the instance at `addr` says its ingest holds the pin.
async fn ingests(s: &Stack, addr: std::net::SocketAddr) -> Result<bool> {
    let text = s
        .http
        .get(format!("http://{addr}/metrics"))
        .bearer_auth(&s.admin)
        .send()
        .await?
        .text()
        .await?;
    let line = text
        .lines()
        .find(|l| l.starts_with("unidesk_ingest_pinned "))
        .ok_or_else(|| anyhow!("no unidesk_ingest_pinned in the metrics"))?;
    Ok(line.ends_with(" 1"))
}

/// The client id the ingest consumer is pinned to, if any.
async fn ingest_pin(store: &ud_core::EventStore) -> Result<Option<String>> {
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = store
        .jetstream()
        .get_consumer_from_stream(ud_core::edge::ingest::CONSUMER, ud_schemas::edge::EDGE_IN)
        .await?;
    Ok(consumer
        .info()
        .await?
        .priority_groups
        .iter()
        .find_map(|g| g.pinned_client_id.clone()))
}

#[tokio::test]
async fn two_main_servers_assign_each_task_once_mark_a_silent_node_offline_once_and_hand_over_the_ingest(
) -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(2)).await?;
    // A second main-server instance on the same hub and database: its own
    // ingest, liveness, scheduler and projectors, no hub reconciler.
    let mut second = server::start(ServerConfig {
        edge: Some(EdgeConfig {
            hub: None,
            controller: ud_core::edge::scheduler::ControllerSettings {
                heartbeat_timeout: Duration::from_secs(2),
                check_interval: Duration::from_millis(50),
                cancel_grace_seconds: 1,
                placement: Default::default(),
                queues: Default::default(),
                lost_after: Duration::ZERO,
                max_lost_after: Duration::from_secs(7 * 24 * 3600),
            },
            git_credentials: Default::default(),
        }),
        ..ServerConfig::local(
            format!("nats://platform:{PLATFORM_PW}@127.0.0.1:{}", s.hub.port()),
            s.pg.url.clone(),
        )
    })
    .await?;
    let token = s.enroll("epsilon").await?;
    let node = s.join("epsilon", token, Duration::from_millis(300)).await?;
    s.node_status(node.id, "online", JOIN).await?;
    let store = s.server.state.commands.store().clone();
    // Both schedulers see every task: the stream's concurrency check lets one assign it.
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(s.submit("true", 60).await?);
    }
    for id in &ids {
        let done = s
            .task_state(id, &["succeeded", "failed"], Duration::from_secs(60))
            .await?;
        assert_eq!(done["state"], "succeeded", "{done}");
        let stored = |kind: &'static str| {
            let subject = format!("ud.task.{id}.{kind}");
            let store = store.clone();
            async move {
                Ok::<_, anyhow::Error>(
                    store
                        .read_subject(ud_schemas::streams::TASKS, &subject)
                        .await?
                        .len(),
                )
            }
        };
        let assigned = stored("assigned").await?;
        assert_eq!(assigned, 1, "task {id} assigned {assigned} times");
        // One instance ingests at a time, so a node's events keep their
        // order: what the run used is recorded before its start.
        let prepared = stored("prepared").await?;
        assert_eq!(prepared, 1, "task {id}: what it ran with was not recorded");
    }
    // Exactly one instance ingested what the node reported.
    let (first_ingests, second_ingests) = (
        ingests(&s, s.server.addr).await?,
        ingests(&s, second.addr).await?,
    );
    assert!(
        first_ingests != second_ingests,
        "ingesting: first {first_ingests}, second {second_ingests}"
    );

    // What the stream stored, not what was published: the instance that
    // loses the race publishes too, and core subscribers see that publish
    // although the stream refuses it.
    let mut offline = store
        .jetstream()
        .get_stream(ud_schemas::streams::NODES)
        .await?
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: format!("ud.node.{}.offline", node.id),
            ..Default::default()
        })
        .await?
        .messages()
        .await?;
    node.agent.abort();
    tokio::time::timeout(Duration::from_secs(30), offline.next())
        .await?
        .ok_or_else(|| anyhow!("no offline"))??;
    s.node_status(node.id, "offline", Duration::from_secs(30))
        .await?;
    // Both instances keep checking every 50 ms: a second offline event would
    // be stored within this window (waiting for something that must not happen).
    let again = tokio::time::timeout(Duration::from_millis(1000), offline.next()).await;
    if again.is_ok() {
        let history = store
            .read_subject(
                ud_schemas::streams::NODES,
                &format!("ud.node.{}.>", node.id),
            )
            .await?;
        let history: Vec<String> = history
            .iter()
            .map(|e| format!("{} {} {:?}", e.seq, e.stored_at, e.envelope.event))
            .collect();
        panic!("a second offline event:\n{}", history.join("\n"));
    }

    // The instance that ingests stops gracefully and the other takes over.
    // The stack's API moves to the one that stays.
    let token = s.enroll("epsilon-2").await?;
    let node = s
        .join("epsilon-2", token, Duration::from_millis(300))
        .await?;
    s.node_status(node.id, "online", Duration::from_secs(60))
        .await?;
    if first_ingests {
        std::mem::swap(&mut s.server, &mut second);
        s.base = format!("http://{}", s.server.addr);
    }
    let pin = ingest_pin(&store).await?;
    assert!(pin.is_some(), "the ingest consumer is pinned to no one");
    second.stop().await;
    // Released, not left to expire: the pin is gone or someone else's.
    let after = ingest_pin(&store).await?;
    assert_ne!(after, pin, "the stopped instance still holds the pin");
    let id = s.submit("true", 60).await?;
    let done = s
        .task_state(&id, &["succeeded", "failed"], Duration::from_secs(60))
        .await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(
        ingests(&s, s.server.addr).await?,
        "the instance left does not ingest"
    );
    Ok(())
}

/// An outcome names its attempt: one about another attempt than the task's
/// (a run lost, then placed again, reporting late) changes nothing.
#[tokio::test]
async fn an_outcome_of_another_attempt_is_refused() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    let node = s.online_node("solo").await?;
    let id = s.submit("sleep 60", 120).await?;
    s.task_state(&id, &["running"], Duration::from_secs(60))
        .await?;
    let task: ud_schemas::TaskId = id.parse()?;
    let client = agent_client(&node.leaf, None).await?;
    let local = async_nats::jetstream::with_domain(client, edge::domain(&node.id));
    let report = |event: ud_schemas::TaskEvent, attempt: u32| -> Result<_> {
        let e = ud_schemas::Event::Task(task, event);
        let (mut h, p) =
            ud_schemas::codec::encode_message(&e, &ud_schemas::codec::EventMeta::new("test"))?;
        h.insert(ud_schemas::headers::ATTEMPT, attempt.to_string().as_str());
        Ok((edge::report_subject(&node.id, &e.subject()), h, p))
    };
    // A success of attempt 2 (the task is on attempt 1), then a failure of
    // attempt 1: the task fails, so the first was refused.
    let stale = report(
        ud_schemas::TaskEvent::Succeeded(ud_schemas::events::TaskSucceeded {
            at: 1,
            exit_code: 0,
        }),
        2,
    )?;
    let current = report(
        ud_schemas::TaskEvent::Failed(ud_schemas::events::TaskFailed {
            at: 2,
            exit_code: Some(9),
            reason: "reported for attempt 1".into(),
        }),
        1,
    )?;
    for (subject, h, p) in [stale, current] {
        local
            .publish_with_headers(subject, h, p.into())
            .await?
            .await?;
    }
    let done = s
        .task_state(&id, &["succeeded", "failed"], Duration::from_secs(30))
        .await?;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["reason"], "reported for attempt 1");
    Ok(())
}

#[tokio::test]
async fn a_cancel_of_another_attempt_leaves_the_run_be() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    let node = s.online_node("tau").await?;
    let id = s
        .submit("trap 'exit 143' TERM; echo up; sleep 60 & wait", 120)
        .await?;
    s.task_state(&id, &["running"], Duration::from_secs(60))
        .await?;
    let task: ud_schemas::TaskId = id.parse()?;
    // A stop of attempt 2, as the platform sends for a stale run of a task
    // whose attempt 1 runs here: the node leaves its run be.
    let js = s.server.state.commands.store().jetstream().clone();
    let (subject, msg) =
        ud_core::edge::dispatch::cancel(&node.id, task, Some(2), "stale assignment", 1)?;
    js.send_publish(subject, msg).await?.await?;
    until_logged(
        &format!("a cancel of another attempt left the run be task_id={task}"),
        Duration::from_secs(60),
    )
    .await?;
    let running = labelled_containers(ud_edge_agent::docker::LABEL_TASK, task, false).await?;
    assert_eq!(running.len(), 1, "the run was stopped: {running:?}");
    // A cancel of the task stops it.
    s.post(
        &format!("/api/v1/tasks/{id}/cancel"),
        json!({"reason": "done"}),
    )
    .await?;
    let done = s
        .task_state(
            &id,
            &["cancelled", "succeeded", "failed"],
            Duration::from_secs(60),
        )
        .await?;
    assert_eq!(done["state"], "cancelled", "{done}");
    node.agent.abort();
    Ok(())
}

/// A run's lines outlast its node's leaf server going down for longer than
/// one try to publish waits: the agent tries each chunk again, and the
/// node's stream keeps a chunk once however often it came.
#[tokio::test]
async fn a_runs_lines_outlast_its_leaf_server_going_down() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    let mut node = s.online_node("echo").await?;
    let task = s
        .submit(
            "i=0; while [ $i -lt 40 ]; do seq $((i*100+1)) $((i*100+100)); i=$((i+1)); sleep 0.2; done",
            120,
        )
        .await?;
    s.task_state(&task, &["running"], Duration::from_secs(60))
        .await?;
    node.leaf.kill().await?;
    // The outage itself: longer than the 5 s one publish waits for its ack.
    tokio::time::sleep(Duration::from_secs(7)).await;
    node.leaf.spawn().await?;
    let done = s
        .task_state(
            &task,
            &["succeeded", "failed", "timed_out", "cancelled", "lost"],
            Duration::from_secs(120),
        )
        .await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    let log = logs(&s, &task).await?;
    for i in 1..=4000 {
        let n = log.lines().filter(|l| *l == i.to_string()).count();
        assert_eq!(n, 1, "line {i} stored {n} times");
    }
    Ok(())
}
