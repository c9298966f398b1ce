//! Compute nodes end to end on real servers: a hub nats-server with leaf
//! nodes for two compute nodes, PostgreSQL, the main server, the agents and
//! a real Docker engine (`DOCKER_HOST`, image `unidesk/busybox:base`).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use futures::StreamExt;
use serde_json::{json, Value};
use ud_edge_agent::AgentConfig;
use ud_schemas::edge;
use ud_schemas::NodeId;
use ud_server::{self as server, EdgeConfig, ServerConfig};

use common::*;

#[tokio::test]
async fn nodes_join_run_tasks_in_docker_and_go_offline() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(3)).await?;
    let token = s.enroll("alpha").await?;
    let alpha = s.join("alpha", token, Duration::from_millis(500)).await?;
    let node = s
        .node_status(alpha.id, "online", Duration::from_secs(30))
        .await?;
    assert_eq!(node["name"], "alpha");
    assert!(
        node["resources"]["cpu_millis"]
            .as_u64()
            .is_some_and(|c| c >= 1000),
        "{node}"
    );
    assert!(node["resources"]["memory_mb"]
        .as_u64()
        .is_some_and(|m| m > 0));
    assert_eq!(node["resources"]["os"], "linux");
    assert!(node["resources"]["docker_version"].is_string());

    // A task runs in a container; its output is kept.
    let done = s
        .runs_ok(
            "echo hello from the node; echo careful >&2",
            60,
            Duration::from_secs(60),
        )
        .await?;
    let ok = done["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(done["exit_code"], 0);
    assert_eq!(done["node_id"], alpha.id.to_string());
    let out = logs(&s, &ok).await?;
    assert!(
        out.contains("hello from the node") && out.contains("careful"),
        "{out:?}"
    );
    let history = s.get(&format!("/api/v1/tasks/{ok}/events")).await?;
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
            "task.prepared",
            "task.started",
            "task.succeeded"
        ]
    );

    // A failing command ends failed with its exit code.
    let bad = s.submit("exit 3", 60).await?;
    let done = s
        .task_state(&bad, &["succeeded", "failed"], Duration::from_secs(60))
        .await?;
    assert_eq!(done["state"], "failed");
    assert_eq!(done["exit_code"], 3);

    // Cancel stops the container.
    let long = s.submit("echo started; sleep 300", 600).await?;
    s.task_state(&long, &["running"], Duration::from_secs(60))
        .await?;
    s.post(
        &format!("/api/v1/tasks/{long}/cancel"),
        json!({"reason": "enough"}),
    )
    .await?;
    let done = s
        .task_state(&long, &["cancelled"], Duration::from_secs(60))
        .await?;
    assert_eq!(done["reason"], "enough");

    // A timeout does the same.
    let slow = s.submit("sleep 300", 2).await?;
    let done = s
        .task_state(&slow, &["timed_out", "failed"], Duration::from_secs(60))
        .await?;
    assert_eq!(done["state"], "timed_out", "{done}");
    assert_eq!(done["reason"], "timed out after 2 s");

    // Silence: offline after the timeout, exactly once; back with the next heartbeat.
    alpha.agent.abort();
    let _ = alpha.agent.await;
    s.node_status(alpha.id, "offline", Duration::from_secs(30))
        .await?;
    let offline = s
        .server
        .state
        .commands
        .store()
        .read_subject(
            ud_schemas::streams::NODES,
            &format!("ud.node.{}.offline", alpha.id),
        )
        .await?;
    assert_eq!(offline.len(), 1);
    let agent = spawn_agent(
        &alpha.leaf,
        &alpha.token,
        "alpha",
        Duration::from_millis(500),
    );
    s.node_status(alpha.id, "online", Duration::from_secs(30))
        .await?;
    agent.abort();
    Ok(())
}

#[tokio::test]
async fn a_node_cannot_act_for_another() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(30)).await?;
    let ta = s.enroll("alpha").await?;
    let tb = s.enroll("beta").await?;
    let a = s.join("alpha", ta, Duration::from_millis(500)).await?;
    let b = s.join("beta", tb, Duration::from_millis(500)).await?;
    s.node_status(a.id, "online", Duration::from_secs(30))
        .await?;
    s.node_status(b.id, "online", Duration::from_secs(30))
        .await?;

    // A client on node A's leaf, as A's agent is.
    let client = agent_client(&a.leaf, Some(a.id)).await?;
    let hub = async_nats::jetstream::with_domain(client.clone(), "hub");
    // B's dispatches, the streams and the JetStream admin API are out of reach.
    let short = Duration::from_secs(2);
    for subject in [
        format!(
            "$JS.hub.API.CONSUMER.MSG.NEXT.UD_DISPATCH.{}",
            edge::dispatch_consumer(&b.id)
        ),
        format!(
            "$JS.hub.API.CONSUMER.INFO.UD_DISPATCH.{}",
            edge::dispatch_consumer(&b.id)
        ),
        "$JS.hub.API.STREAM.LIST".to_owned(),
        "$JS.hub.API.STREAM.INFO.UD_TASKS".to_owned(),
        "$JS.hub.API.STREAM.MSG.GET.UD_TASKS".to_owned(),
    ] {
        let r = tokio::time::timeout(short, client.request(subject.clone(), "{}".into())).await;
        assert!(!matches!(r, Ok(Ok(_))), "{subject} answered");
    }
    // Its own consumer works.
    let own: Result<async_nats::jetstream::consumer::PullConsumer, _> = hub
        .get_consumer_from_stream(edge::dispatch_consumer(&a.id), edge::DISPATCH)
        .await;
    assert!(own.is_ok());
    let mut spy = client.subscribe(format!("ud.dispatch.{}.>", b.id)).await?;

    // A long task lands on one of them; find who runs it.
    let task = s.submit("sleep 300", 600).await?;
    let running = s
        .task_state(&task, &["running"], Duration::from_secs(60))
        .await?;
    let runner: NodeId = running["node_id"].as_str().unwrap_or_default().parse()?;
    let (liar, liar_leaf) = if runner == a.id {
        (b.id, &b.leaf)
    } else {
        (a.id, &a.leaf)
    };
    if runner == b.id {
        let got = tokio::time::timeout(Duration::from_millis(500), spy.next()).await;
        assert!(got.is_err(), "node A saw B's dispatch");
    }

    // The other node, which controls its own leaf, writes forged events into
    // its own stream: the task's success, and a heartbeat in the runner's name.
    let liar_client = agent_client(liar_leaf, None).await?;
    let local = async_nats::jetstream::with_domain(liar_client.clone(), edge::domain(&liar));
    let mut cfg = local
        .get_stream(edge::stream(&liar))
        .await?
        .info()
        .await?
        .config
        .clone();
    cfg.subjects.push(format!("ud.edge.{runner}.>"));
    local.update_stream(&cfg).await?;
    let task_id: ud_schemas::TaskId = task.parse()?;
    let forged = ud_schemas::Event::Task(
        task_id,
        ud_schemas::TaskEvent::Succeeded(ud_schemas::events::TaskSucceeded {
            at: 1,
            exit_code: 0,
        }),
    );
    let (h, p) =
        ud_schemas::codec::encode_message(&forged, &ud_schemas::codec::EventMeta::new("liar"))?;
    local
        .publish_with_headers(edge::report_subject(&liar, &forged.subject()), h, p.into())
        .await?
        .await?;
    let beat = ud_schemas::Event::Node(
        runner,
        ud_schemas::NodeEvent::Heartbeat(ud_schemas::events::NodeHeartbeat {
            at: 1,
            running_tasks: 99,
            disk_free_mb: None,
            low_disk: false,
        }),
    );
    let (h, p) =
        ud_schemas::codec::encode_message(&beat, &ud_schemas::codec::EventMeta::new("liar"))?;
    local
        .publish_with_headers(edge::report_subject(&runner, &beat.subject()), h, p.into())
        .await?
        .await?;
    // A marker from the liar after the forgeries: once it is in, they were handled.
    let marker = ud_schemas::Event::Node(
        liar,
        ud_schemas::NodeEvent::Registered(ud_schemas::events::NodeRegistered {
            at: 2,
            name: "liar-marker".into(),
            labels: BTreeMap::new(),
            resources: Default::default(),
        }),
    );
    let (h, p) =
        ud_schemas::codec::encode_message(&marker, &ud_schemas::codec::EventMeta::new("liar"))?;
    local
        .publish_with_headers(edge::report_subject(&liar, &marker.subject()), h, p.into())
        .await?
        .await?;
    let (http, base, admin) = (s.http.clone(), s.base.clone(), s.admin.clone());
    s.until("the marker", Duration::from_secs(30), move || {
        let (http, base, admin) = (http.clone(), base.clone(), admin.clone());
        async move {
            let v: Value = http
                .get(format!("{base}/api/v1/nodes/{liar}"))
                .bearer_auth(&admin)
                .send()
                .await?
                .json()
                .await?;
            Ok((v["name"] == "liar-marker").then_some(v))
        }
    })
    .await?;
    let t = s.get(&format!("/api/v1/tasks/{task}")).await?;
    assert_eq!(t["state"], "running", "a forged success was accepted");
    let r = s.get(&format!("/api/v1/nodes/{runner}")).await?;
    assert_ne!(r["running_tasks"], 99, "a forged heartbeat was accepted");

    // Revocation closes the node's link and it cannot come back.
    let leafz = |s: &Stack| {
        let url = format!("{}/leafz", s.hub.monitor_url());
        async move {
            Ok::<u64, anyhow::Error>(
                reqwest::get(url).await?.json::<Value>().await?["leafnodes"]
                    .as_u64()
                    .unwrap_or(0),
            )
        }
    };
    assert_eq!(leafz(&s).await?, 2);
    s.post(&format!("/api/v1/nodes/{liar}/revoke"), json!({}))
        .await?;
    let mut gone = false;
    for _ in 0..100 {
        if leafz(&s).await? == 1 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the revoked node is still connected");
    let r = s.get(&format!("/api/v1/nodes/{liar}")).await?;
    assert_eq!(r["status"], "revoked");
    Ok(())
}

#[tokio::test]
async fn a_node_keeps_working_while_its_link_is_down_and_catches_up() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    let token = s.enroll("gamma").await?;
    let link = ud_testkit::Relay::start(s.hub.leaf_port()).await?;
    let node = s
        .join_via("gamma", token, Duration::from_millis(500), link.port())
        .await?;
    s.node_status(node.id, "online", Duration::from_secs(30))
        .await?;

    // Watch the node's own stream for the task's end, from the node's side.
    let local = agent_client(&node.leaf, None).await?;
    let task = s
        .submit("echo before the cut; sleep 2; echo after the cut", 120)
        .await?;
    let mut ended = local
        .subscribe(format!("ud.edge.{}.task.{task}.*", node.id))
        .await?;
    s.task_state(&task, &["running"], Duration::from_secs(60))
        .await?;
    link.cut();
    // The task finishes while the hub cannot hear of it.
    let end = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(m) = ended.next().await {
            if !m.subject.ends_with(".started") && !m.subject.ends_with(".prepared") {
                return Some(m.subject.to_string());
            }
        }
        None
    })
    .await?
    .ok_or_else(|| anyhow!("no end"))?;
    assert!(end.ends_with(".succeeded"), "{end}");
    let t = s.get(&format!("/api/v1/tasks/{task}")).await?;
    assert_eq!(
        t["state"], "running",
        "the hub heard of the end through a cut link"
    );
    link.restore();
    let done = s
        .task_state(&task, &["succeeded"], Duration::from_secs(60))
        .await?;
    assert_eq!(done["exit_code"], 0);
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
            "task.prepared",
            "task.started",
            "task.succeeded"
        ]
    );
    let out = logs(&s, &task).await?;
    assert!(
        out.contains("before the cut") && out.contains("after the cut"),
        "{out:?}"
    );
    node.agent.abort();
    Ok(())
}

#[tokio::test]
async fn a_dispatch_that_went_stale_while_the_node_was_away_is_never_run() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    let token = s.enroll("delta").await?;
    let link = ud_testkit::Relay::start(s.hub.leaf_port()).await?;
    let node = s
        .join_via("delta", token, Duration::from_millis(500), link.port())
        .await?;
    s.node_status(node.id, "online", Duration::from_secs(30))
        .await?;
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
    let docker = bollard::Docker::connect_with_local_defaults()?;
    let filters = std::collections::HashMap::from([(
        "label".to_owned(),
        vec![format!("{}={task}", ud_edge_agent::docker::LABEL_TASK)],
    )]);
    let made = docker
        .list_containers(Some(bollard::query_parameters::ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await?;
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
async fn cordoned_and_draining_nodes_take_no_new_tasks_until_resumed() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    let a = s.online_node("zeta").await?;
    let long = s
        .submit("sleep 2; echo finished-while-draining", 60)
        .await?;
    s.task_state(&long, &["running"], Duration::from_secs(60))
        .await?;
    let v = s
        .post(
            &format!("/api/v1/nodes/{}/drain", a.id),
            json!({"reason": "disk swap"}),
        )
        .await?;
    assert_eq!(v["scheduling"], "draining", "{v}");
    // A second node joins; the draining one takes nothing new.
    let b = s.online_node("eta").await?;
    let second = s.submit("echo on-the-active-node", 60).await?;
    let done = s
        .task_state(&second, &["succeeded", "failed"], Duration::from_secs(60))
        .await?;
    assert_eq!(done["node_id"], b.id.to_string(), "{done}");
    // The running task finished where it was.
    let done = s
        .task_state(&long, &["succeeded", "failed"], Duration::from_secs(60))
        .await?;
    assert_eq!(
        (done["state"].as_str(), done["node_id"].as_str()),
        (Some("succeeded"), Some(a.id.to_string().as_str()))
    );
    // Both out of service: a task waits; resuming the first places it there.
    let v = s
        .post(&format!("/api/v1/nodes/{}/cordon", b.id), json!({}))
        .await?;
    assert_eq!(v["scheduling"], "cordoned");
    let third = s.submit("echo after-resume", 60).await?;
    // It says why it waits.
    let waiting = s
        .task_until(&third, "the waiting reason", Duration::from_secs(30), |v| {
            v["waiting_reason"]
                .as_str()
                .is_some_and(|r| r.contains("cordoned 1") && r.contains("draining 1"))
        })
        .await?;
    assert_eq!(waiting["state"], "pending", "{waiting}");
    // A request no enrolled node could ever meet fails at once, saying so.
    let impossible = s
        .submit_body(task_body(
            "lab",
            "true",
            json!({"cpus": 0.5, "memory_mb": 64, "gpus": 64}),
        ))
        .await?;
    let done = s
        .task_state(&impossible, &["failed"], Duration::from_secs(30))
        .await?;
    assert!(
        done["reason"].as_str().is_some_and(
            |r| r.contains("no enrolled node could ever run it") && r.contains("64 GPUs")
        ),
        "{done}"
    );
    let v = s
        .post(
            &format!("/api/v1/nodes/{}/resume", a.id),
            json!({"reason": "disk replaced"}),
        )
        .await?;
    assert_eq!(v["scheduling"], "active");
    let done = s
        .task_state(&third, &["succeeded", "failed"], Duration::from_secs(60))
        .await?;
    assert_eq!(
        done["node_id"],
        a.id.to_string(),
        "a cordoned node took a task: {done}"
    );
    assert!(done["waiting_reason"].is_null(), "{done}");
    let history = s.get(&format!("/api/v1/tasks/{third}/events")).await?;
    let types: Vec<&str> = history
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert_eq!(
        &types[..3],
        ["task.submitted", "task.waiting", "task.assigned"],
        "{types:?}"
    );
    // Unknown nodes and bodies are clear errors.
    let resp = s
        .http
        .post(format!("{}/api/v1/nodes/{}/cordon", s.base, NodeId::new()))
        .bearer_auth(&s.admin)
        .send()
        .await?;
    assert_eq!(resp.status(), reqwest::StatusCode::NOT_FOUND);
    let resp = s
        .http
        .post(format!("{}/api/v1/nodes/{}/drain", s.base, a.id))
        .bearer_auth(&s.admin)
        .json(&json!({"why": 1}))
        .send()
        .await?;
    assert_eq!(resp.status(), reqwest::StatusCode::BAD_REQUEST);
    a.agent.abort();
    b.agent.abort();
    Ok(())
}

#[tokio::test]
async fn a_task_lost_with_its_node_runs_elsewhere_and_the_lost_run_is_stopped() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(3)).await?;
    let a = s.online_node("theta").await?;
    let task = s.submit("sleep 15; echo finished", 120).await?;
    let running = s
        .task_state(&task, &["running"], Duration::from_secs(60))
        .await?;
    assert_eq!(running["node_id"], a.id.to_string());
    // The node goes silent (its container keeps running); another node is there.
    a.agent.abort();
    let b = s
        .join("iota", s.enroll("iota").await?, Duration::from_millis(500))
        .await?;
    s.node_status(a.id, "offline", Duration::from_secs(30))
        .await?;
    let other = b.id.to_string();
    s.task_until(
        &task,
        "the task to run on the other node",
        Duration::from_secs(60),
        move |v| v["state"] == "running" && v["node_id"] == other.as_str(),
    )
    .await?;
    // The first node comes back with the lost run still going: it is stopped.
    let local = agent_client(&a.leaf, None).await?;
    let mut stopped = local
        .subscribe(format!("ud.edge.{}.task.{task}.cancelled", a.id))
        .await?;
    let back = spawn_agent(&a.leaf, &a.token, "theta", Duration::from_millis(500));
    tokio::time::timeout(Duration::from_secs(30), stopped.next())
        .await?
        .ok_or_else(|| anyhow!("the lost run was not stopped"))?;
    let done = s
        .task_state(
            &task,
            &["succeeded", "failed", "cancelled"],
            Duration::from_secs(60),
        )
        .await?;
    assert_eq!(
        (done["state"].as_str(), done["node_id"].as_str()),
        (Some("succeeded"), Some(b.id.to_string().as_str())),
        "{done}"
    );
    assert_eq!(done["attempt"], 2);
    let history = s.get(&format!("/api/v1/tasks/{task}/events")).await?;
    // (A `task.waiting` note may come between, if the other node was not yet online.)
    let types: Vec<&str> = history
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["type"].as_str())
        .filter(|t| *t != "task.waiting")
        .collect();
    assert_eq!(
        types,
        vec![
            "task.submitted",
            "task.assigned",
            "task.prepared",
            "task.started",
            "task.lost",
            "task.assigned",
            "task.prepared",
            "task.started",
            "task.succeeded"
        ]
    );
    back.abort();
    b.agent.abort();
    Ok(())
}

/// An assignment stored for a node that is offline by then (another main
/// server's view was behind, or the two crossed) does not strand its task:
/// the task is lost with that node and runs elsewhere.
#[tokio::test]
async fn a_task_assigned_to_a_node_already_offline_runs_elsewhere() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(3)).await?;
    let gone = s.online_node("lambda").await?;
    gone.agent.abort();
    s.node_status(gone.id, "offline", Duration::from_secs(30))
        .await?;
    let task = s.submit("echo placed again", 60).await?;
    let id: ud_schemas::TaskId = task.parse().map_err(|e| anyhow!("{e}"))?;
    // What a lagging scheduler would write: the task assigned to the gone node.
    let store = s.server.state.commands.store().clone();
    let mut assigned = false;
    for _ in 0..20 {
        let (t, seq) = store
            .load_task(&id)
            .await?
            .ok_or_else(|| anyhow!("no task {id}"))?;
        let events = ud_core::task::decide(
            Some(&t),
            ud_core::task::TaskCommand::Assign { node_id: gone.id },
            ud_schemas::now_millis(),
        )?;
        let events: Vec<ud_schemas::Event> = events
            .into_iter()
            .map(|e| ud_schemas::Event::Task(id, e))
            .collect();
        match store
            .append_all(
                &events,
                &ud_schemas::codec::EventMeta::new("scheduler"),
                ud_core::store::Expect::LastSeq(seq),
            )
            .await
        {
            Ok(_) => {
                assigned = true;
                break;
            }
            // A note on why it waits came between: read it again.
            Err(ud_core::StoreError::Conflict) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    assert!(assigned, "the assignment could not be written");
    let other = s.online_node("mu").await?;
    let on = other.id.to_string();
    let done = s
        .task_until(
            &task,
            "the task to succeed on the other node",
            Duration::from_secs(60),
            move |v| v["state"] == "succeeded" && v["node_id"] == on.as_str(),
        )
        .await?;
    assert_eq!(done["attempt"], 2, "{done}");
    let history = s.get(&format!("/api/v1/tasks/{task}/events")).await?;
    let steps: Vec<(String, String)> = history
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["type"] == "task.assigned" || e["type"] == "task.lost")
        .map(|e| {
            let node = e["data"]["node_id"].as_str().unwrap_or_default().to_owned();
            (e["type"].as_str().unwrap_or_default().to_owned(), node)
        })
        .collect();
    let (gone, other) = (gone.id.to_string(), other.id.to_string());
    assert_eq!(
        steps,
        vec![
            ("task.assigned".to_owned(), gone.clone()),
            ("task.lost".to_owned(), gone),
            ("task.assigned".to_owned(), other),
        ],
        "{history}"
    );
    Ok(())
}

#[tokio::test]
async fn failed_runs_are_retried_per_their_policy() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    let node = s.online_node("kappa").await?;
    let mut body = task_body(
        "lab",
        "echo attempt; exit 3",
        json!({"cpus": 0.5, "memory_mb": 64}),
    );
    body["retry"] = json!({"max_attempts": 2, "backoff_seconds": 1});
    let id = s.submit_body(body).await?;
    let done = s
        .task_state(&id, &["succeeded", "failed"], Duration::from_secs(60))
        .await?;
    assert_eq!(
        (
            done["state"].as_str(),
            done["attempt"].as_i64(),
            done["exit_code"].as_i64()
        ),
        (Some("failed"), Some(2), Some(3)),
        "{done}"
    );
    let history = s.get(&format!("/api/v1/tasks/{id}/events")).await?;
    let events: Vec<&Value> = history.as_array().into_iter().flatten().collect();
    let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(
        types,
        vec![
            "task.submitted",
            "task.assigned",
            "task.prepared",
            "task.started",
            "task.retrying",
            "task.assigned",
            "task.prepared",
            "task.started",
            "task.failed"
        ]
    );
    // The second attempt waited out the backoff.
    let at = |t: &str, nth: usize| {
        events
            .iter()
            .filter(|e| e["type"] == t)
            .nth(nth)
            .and_then(|e| e["data"]["at"].as_i64())
            .unwrap_or_default()
    };
    assert!(
        at("task.assigned", 1) - at("task.retrying", 0) >= 1000,
        "{history}"
    );
    let out = logs(&s, &id).await?;
    assert_eq!(out.matches("attempt").count(), 2, "{out:?}");
    node.agent.abort();
    Ok(())
}

#[tokio::test]
async fn pending_tasks_go_by_priority_then_projects_take_turns() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    let node = s
        .join(
            "lambda",
            s.enroll("lambda").await?,
            Duration::from_millis(500),
        )
        .await?;
    let v = s
        .node_status(node.id, "online", Duration::from_secs(30))
        .await?;
    // Every task takes the whole node, so they run one at a time.
    let cpus = v["resources"]["cpu_millis"].as_f64().unwrap_or(1000.0) / 1000.0;
    let task = |project: &str, script: &str| {
        task_body(project, script, json!({"cpus": cpus, "memory_mb": 64}))
    };
    let blocker = s.submit_body(task("alpha", "sleep 3")).await?;
    s.task_state(&blocker, &["running"], Duration::from_secs(60))
        .await?;
    let a1 = s.submit_body(task("alpha", "true")).await?;
    let a2 = s.submit_body(task("alpha", "true")).await?;
    let a3 = s.submit_body(task("alpha", "true")).await?;
    let b1 = s.submit_body(task("beta", "true")).await?;
    s.post(
        &format!("/api/v1/tasks/{a3}/priority?wait=projected"),
        json!({"priority": 10}),
    )
    .await?;
    assert_eq!(s.get(&format!("/api/v1/tasks/{a3}")).await?["priority"], 10);
    let mut started = Vec::new();
    for id in [&a1, &a2, &a3, &b1] {
        s.task_state(id, &["succeeded"], Duration::from_secs(60))
            .await?;
        let history = s.get(&format!("/api/v1/tasks/{id}/events")).await?;
        let at = history
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["type"] == "task.assigned")
            .and_then(|e| e["data"]["at"].as_i64());
        started.push((at.unwrap_or(i64::MAX), id.clone()));
    }
    started.sort();
    let order: Vec<String> = started.into_iter().map(|(_, id)| id).collect();
    // a3 by priority; then beta, which alpha (served twice) owes a turn; then alpha's in order.
    assert_eq!(
        order,
        vec![a3.clone(), b1, a1, a2],
        "priority first, then the projects take turns"
    );
    // Only a pending task's priority can change; bad values are named.
    let resp = s
        .http
        .post(format!("{}/api/v1/tasks/{a3}/priority", s.base))
        .bearer_auth(&s.admin)
        .json(&json!({"priority": 5}))
        .send()
        .await?;
    assert_eq!(resp.status(), reqwest::StatusCode::CONFLICT);
    let resp = s
        .http
        .post(format!("{}/api/v1/tasks/{blocker}/priority", s.base))
        .bearer_auth(&s.admin)
        .json(&json!({"priority": 5000}))
        .send()
        .await?;
    assert_eq!(resp.status(), reqwest::StatusCode::BAD_REQUEST);
    assert!(resp.text().await?.contains("priority"));
    node.agent.abort();
    Ok(())
}

#[tokio::test]
async fn a_queue_runs_no_more_than_its_limit_at_once() -> Result<()> {
    let queues = ud_core::edge::scheduler::Queues::parse(
        r#"{"queues": {"serial": {"priority": 5, "max_running": 1}}}"#,
    )?;
    let mut s = Stack::start_with(Duration::from_secs(60), Default::default(), queues).await?;
    let node = s.online_node("mu").await?;
    let serial = |script: &str| {
        let mut b = task_body("lab", script, json!({"cpus": 0.25, "memory_mb": 32}));
        b["queue"] = json!("serial");
        b
    };
    let first = s.submit_body(serial("sleep 2")).await?;
    let second = s.submit_body(serial("true")).await?;
    s.task_state(&first, &["running"], Duration::from_secs(60))
        .await?;
    // The node has room, the queue does not: the second waits and says why.
    let waiting = s
        .task_until(&second, "the queue limit", Duration::from_secs(30), |v| {
            v["waiting_reason"]
                .as_str()
                .is_some_and(|r| r.contains("limit of 1"))
        })
        .await?;
    assert_eq!(waiting["state"], "pending", "{waiting}");
    // Another queue's task runs meanwhile.
    s.runs_ok("true", 60, Duration::from_secs(60)).await?;
    let running = s.get(&format!("/api/v1/tasks/{first}")).await?;
    assert_eq!(
        running["state"], "running",
        "the other queue's task waited: {running}"
    );
    let done = s
        .task_state(&second, &["succeeded", "failed"], Duration::from_secs(60))
        .await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    let at = |history: &Value, t: &str| {
        history
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["type"] == t)
            .and_then(|e| e["data"]["at"].as_i64())
    };
    let first_end = at(
        &s.get(&format!("/api/v1/tasks/{first}/events")).await?,
        "task.succeeded",
    );
    let second_placed = at(
        &s.get(&format!("/api/v1/tasks/{second}/events")).await?,
        "task.assigned",
    );
    assert!(
        first_end.is_some() && second_placed >= first_end,
        "the second was placed before the first ended: {second_placed:?} < {first_end:?}"
    );
    node.agent.abort();
    Ok(())
}

#[tokio::test]
async fn a_queue_limit_set_through_the_api_applies_at_once() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    let node = s.online_node("nu").await?;
    let (http, url, admin) = (
        s.http.clone(),
        format!("{}/api/v1/queues/serial", s.base),
        s.admin.clone(),
    );
    let set = |limit: u32| {
        let (http, url, admin) = (http.clone(), url.clone(), admin.clone());
        async move {
            http.put(url)
                .bearer_auth(admin)
                .json(&json!({"max_running": limit}))
                .send()
                .await?
                .error_for_status()?;
            anyhow::Ok(())
        }
    };
    set(1).await?;
    let serial = |script: &str| {
        let mut b = task_body("lab", script, json!({"cpus": 0.25, "memory_mb": 32}));
        b["queue"] = json!("serial");
        b
    };
    let first = s.submit_body(serial("sleep 30")).await?;
    s.task_state(&first, &["running"], Duration::from_secs(60))
        .await?;
    let second = s.submit_body(serial("true")).await?;
    s.task_until(&second, "the queue limit", Duration::from_secs(30), |v| {
        v["waiting_reason"]
            .as_str()
            .is_some_and(|r| r.contains("limit of 1"))
    })
    .await?;
    // Raised while the first still runs: the second is placed and runs now.
    set(2).await?;
    let done = s
        .task_state(&second, &["succeeded", "failed"], Duration::from_secs(60))
        .await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    let first_now = s.get(&format!("/api/v1/tasks/{first}")).await?;
    assert_eq!(first_now["state"], "running", "{first_now}");
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
    s.node_status(node.id, "online", Duration::from_secs(30))
        .await?;
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
    s.node_status(node.id, "online", Duration::from_secs(30))
        .await?;
    // A run that stops at once when asked to (so that its end is its limit).
    let task = s
        .submit("trap 'exit 143' TERM; echo up; sleep 60 & wait", 6)
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
    let ended = stored_at(&s, &task, "task.timed_out").await?;
    assert_eq!(started.len(), 1, "started once: {started:?}");
    let ran = ended.first().copied().unwrap_or(i64::MAX) - started[0];
    // Stopped at its 6 s limit, not 6 s after the restart (9 s or more).
    assert!(
        (5_000..8_500).contains(&ran),
        "timed out {ran} ms after it started"
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
    s.node_status(node.id, "online", Duration::from_secs(30))
        .await?;
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
            },
            git_credentials: Default::default(),
        }),
        ..ServerConfig::local(
            format!("nats://platform:{PLATFORM_PW}@127.0.0.1:{}", s.hub.port()),
            s._pg.url.clone(),
        )
    })
    .await?;
    let token = s.enroll("epsilon").await?;
    let node = s.join("epsilon", token, Duration::from_millis(300)).await?;
    s.node_status(node.id, "online", Duration::from_secs(30))
        .await?;
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

fn git(dir: &std::path::Path, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("git")
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.org",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .output()?;
    if !out.status.success() {
        bail!("git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

fn commit_all(dir: &std::path::Path, message: &str) -> Result<String> {
    git(dir, &["add", "-A"])?;
    git(dir, &["commit", "-q", "-m", message])?;
    git(dir, &["rev-parse", "HEAD"])
}

#[tokio::test]
async fn tasks_run_pinned_code_in_environments_built_from_their_repository() -> Result<()> {
    let repos = tempfile::tempdir()?;
    let env_dir = repos.path().join("env");
    let code_dir = repos.path().join("code");
    for d in [&env_dir, &code_dir] {
        std::fs::create_dir_all(d)?;
        git(d, &["init", "-q"])?;
    }
    std::fs::create_dir_all(env_dir.join("envs/a"))?;
    std::fs::write(
        env_dir.join("envs/a/Dockerfile"),
        "FROM unidesk/busybox:base\nRUN echo env-a > /env.txt\n",
    )?;
    std::fs::create_dir_all(env_dir.join("envs/broken"))?;
    std::fs::write(
        env_dir.join("envs/broken/Dockerfile"),
        "FROM unidesk/busybox:base\nRUN exit 7\n",
    )?;
    std::fs::create_dir_all(env_dir.join("envs/b"))?;
    std::fs::write(
        env_dir.join("envs/b/Dockerfile"),
        "FROM unidesk/busybox:base\nRUN echo env-b > /env.txt\n",
    )?;
    std::fs::create_dir_all(env_dir.join("envs/slow"))?;
    std::fs::write(
        env_dir.join("envs/slow/Dockerfile"),
        "FROM unidesk/busybox:base\nRUN sleep 60\n",
    )?;
    std::os::unix::fs::symlink("/etc", env_dir.join("outside"))?;
    let env_commit = commit_all(&env_dir, "environments")?;
    std::fs::write(code_dir.join("run.sh"), "echo code-v1; cat /env.txt; pwd\n")?;
    let v1 = commit_all(&code_dir, "v1")?;
    std::fs::write(code_dir.join("run.sh"), "echo code-v2; cat /env.txt\n")?;
    let v2 = commit_all(&code_dir, "v2")?;

    let mut s = Stack::start(Duration::from_secs(60)).await?;
    let token = s.enroll("builder").await?;
    let leaf = s.leaf(&token, s.hub.leaf_port()).await?;
    let work = tempfile::tempdir()?;
    let agent = run_agent(AgentConfig {
        image: None,
        work_dir: work.path().to_owned(),
        build_timeout: Duration::from_secs(10),
        // Room for one environment: the next one evicts the least recently used.
        cache_limit_mb: 0,
        labels: BTreeMap::new(),
        ..agent_config(&leaf, &token, "builder", Duration::from_millis(500))
    });
    s.node_status(token.node_id, "online", Duration::from_secs(30))
        .await?;

    let url = |d: &std::path::Path| format!("file://{}", d.display());
    let submit = |code: &str, env: &str, dockerfile: &str| {
        json!({
            "project": "lab", "code_repo_url": url(&code_dir), "code_commit_id": code,
            "env_repo_url": url(&env_dir), "env_commit_id": env, "dockerfile_path": dockerfile,
            "command": ["sh", "run.sh"], "resources": {"cpus": 0.5, "memory_mb": 64}, "timeout_seconds": 120
        })
    };

    // First run: fetch both repositories, build the environment, run the code.
    let first = s
        .submit_body(submit(&v1, &env_commit, "envs/a/Dockerfile"))
        .await?;
    let done = s
        .task_state(&first, &["succeeded", "failed"], Duration::from_secs(120))
        .await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    let out = logs(&s, &first).await?;
    assert!(
        out.contains("code-v1") && out.contains("env-a") && out.contains("/workspace"),
        "{out:?}"
    );
    assert!(
        out.contains("Step 1/2"),
        "the build log is kept with the task: {out:?}"
    );
    // What the run really used.
    let ran = &done["prepared"];
    assert_eq!(ran["code_commit_id"], v1.as_str());
    assert_eq!(ran["env_commit_id"], env_commit.as_str());
    let dockerfile = std::fs::read(env_dir.join("envs/a/Dockerfile"))?;
    assert_eq!(ran["dockerfile_digest"], hex_sha256(&dockerfile));
    assert!(
        ran["image_id"]
            .as_str()
            .is_some_and(|i| i.starts_with("sha256:")),
        "{ran}"
    );
    let steps: Vec<&str> = ran["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(
        steps,
        vec![
            "fetch_code",
            "fetch_environment",
            "build_image",
            "checkout",
            "start"
        ]
    );
    // Each step was an event as it began, so the task showed it while preparing.
    let history = s.get(&format!("/api/v1/tasks/{first}/events")).await?;
    let began: Vec<&str> = history
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["type"] == "task.preparing")
        .filter_map(|e| e["data"]["step"].as_str())
        .collect();
    assert_eq!(began, steps);
    assert!(done["preparing"].is_null(), "{done}");

    // Same environment, new commit of the code: no build, the new code.
    let second = s
        .submit_body(submit(&v2, &env_commit, "envs/a/Dockerfile"))
        .await?;
    let done = s
        .task_state(&second, &["succeeded", "failed"], Duration::from_secs(120))
        .await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    let out = logs(&s, &second).await?;
    assert!(out.contains("code-v2") && out.contains("env-a"), "{out:?}");
    assert!(
        !out.contains("Step 1/2"),
        "the environment was built again: {out:?}"
    );
    let steps: Vec<&str> = done["prepared"]["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(
        steps,
        vec!["fetch_code", "fetch_environment", "checkout", "start"]
    );
    assert_eq!(
        done["prepared"]["image_id"],
        ran_image_id(&s, &first).await?
    );

    // Bad versions end the task with the step and the reason.
    let cases = [
        (
            submit(&"0".repeat(40), &env_commit, "envs/a/Dockerfile"),
            "is not in",
        ),
        (
            submit(&v1, &env_commit, "outside/passwd"),
            "dockerfile_path",
        ),
        (
            submit(&v1, &env_commit, "envs/missing/Dockerfile"),
            "dockerfile_path",
        ),
        (
            submit(&v1, &env_commit, "envs/broken/Dockerfile"),
            "building the environment image",
        ),
        (
            submit(&v1, &env_commit, "envs/slow/Dockerfile"),
            "ran past its time limit of 10 s",
        ),
    ];
    for (i, (body, reason)) in cases.into_iter().enumerate() {
        let id = s.submit_body(body).await?;
        if i == 4 {
            // A long build shows as the step under way.
            let shown = s
                .task_until(
                    &id,
                    "the build step to show",
                    Duration::from_secs(60),
                    |v| v["preparing"]["step"] == "build_image",
                )
                .await?;
            assert_eq!(shown["state"], "assigned", "{shown}");
            assert!(shown["preparing"]["since"].is_string(), "{shown}");
        }
        let done = s
            .task_state(&id, &["succeeded", "failed"], Duration::from_secs(120))
            .await?;
        assert_eq!(done["state"], "failed", "{done}");
        assert!(
            done["reason"].as_str().is_some_and(|r| r.contains(reason)),
            "expected {reason:?}: {done}"
        );
    }
    // The node stays healthy: a good task still runs.
    let last = s
        .submit_body(submit(&v1, &env_commit, "envs/a/Dockerfile"))
        .await?;
    let done = s
        .task_state(&last, &["succeeded", "failed"], Duration::from_secs(120))
        .await?;
    assert_eq!(done["state"], "succeeded");
    // Another environment on a full cache: the least recently used image goes.
    // An environment image of another node on the same Docker engine: not
    // this agent's to evict.
    let docker = bollard::Docker::connect_with_local_defaults()?;
    let foreign = format!("another-node-{}", token.node_id);
    docker
        .tag_image(
            "unidesk/busybox:base",
            Some(
                bollard::query_parameters::TagImageOptionsBuilder::new()
                    .repo("unidesk-env")
                    .tag(&foreign)
                    .build(),
            ),
        )
        .await?;
    let other = s
        .submit_body(submit(&v1, &env_commit, "envs/b/Dockerfile"))
        .await?;
    let done = s
        .task_state(&other, &["succeeded", "failed"], Duration::from_secs(120))
        .await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(logs(&s, &other).await?.contains("env-b"));
    let foreign = format!("unidesk-env:{foreign}");
    let kept = docker.inspect_image(&foreign).await.is_ok();
    let _ = docker
        .remove_image(
            &foreign,
            None::<bollard::query_parameters::RemoveImageOptions>,
            None,
        )
        .await;
    assert!(kept, "{foreign}, another node's image, was evicted");
    let spec_of = |path: &str| -> Result<ud_schemas::TaskSpec> {
        Ok(serde_json::from_value(json!({
            "name": null, "code_repo_url": url(&code_dir), "code_commit_id": v1, "env_repo_url": url(&env_dir),
            "env_commit_id": env_commit, "dockerfile_path": path, "command": ["sh"], "args": [], "env": {},
            "resources": {"cpu_millis": 1, "memory_mb": 1, "gpus": 0, "gpu_model": null, "labels": {}},
            "timeout_seconds": 1, "retry": {"max_attempts": 1, "backoff_seconds": 0}
        }))?)
    };
    let a_tag = ud_edge_agent::env::image_tag(&spec_of("envs/a/Dockerfile")?);
    let b_tag = ud_edge_agent::env::image_tag(&spec_of("envs/b/Dockerfile")?);
    assert!(
        docker.inspect_image(&a_tag).await.is_err(),
        "{a_tag} was not evicted"
    );
    assert!(
        docker.inspect_image(&b_tag).await.is_ok(),
        "{b_tag} was evicted while in use"
    );
    agent.abort();
    Ok(())
}

/// Every message stored in `stream`, raw.
async fn stream_bytes(s: &Stack, stream: &str) -> Result<Vec<u8>> {
    let js = s.server.state.commands.store().jetstream().clone();
    let mut st = js.get_stream(stream).await?;
    let last = st.info().await?.state.last_sequence;
    let mut out = Vec::new();
    let mut seq = 1;
    while seq <= last {
        if let Ok(m) = st.get_raw_message(seq).await {
            out.extend_from_slice(&m.payload);
            out.extend_from_slice(format!("{:?}", m.headers).as_bytes());
        }
        seq += 1;
    }
    Ok(out)
}

#[tokio::test]
async fn private_repositories_are_fetched_with_credentials_the_platform_holds_and_never_shows(
) -> Result<()> {
    const TOKEN: &str = "tok-3f9a1c-kept-by-the-platform";
    let root = tempfile::tempdir()?;
    let src = root.path().join("src");
    std::fs::create_dir_all(&src)?;
    git(&src, &["init", "-q"])?;
    std::fs::write(
        src.join("Dockerfile"),
        "FROM unidesk/busybox:base\nRUN echo env-private > /env.txt\n",
    )?;
    std::fs::write(
        src.join("run.sh"),
        "env; cat /env.txt; echo private-code-ran\n",
    )?;
    let commit = commit_all(&src, "private")?;
    let served = root.path().join("served");
    std::fs::create_dir_all(&served)?;
    git(
        &served,
        &[
            "clone",
            "-q",
            "--bare",
            &src.display().to_string(),
            "private.git",
        ],
    )?;
    // Smart HTTP behind basic authentication: the right token, no entry, a wrong token.
    let good = ud_testkit::GitHttpServer::start(&served, Some(("ci", TOKEN))).await?;
    let unknown = ud_testkit::GitHttpServer::start(&served, Some(("ci", TOKEN))).await?;
    let wrong = ud_testkit::GitHttpServer::start(&served, Some(("ci", TOKEN))).await?;
    let file = json!({"hosts": {
        format!("127.0.0.1:{}", good.port()): {"username": "ci", "token": TOKEN, "allow_http": true},
        format!("127.0.0.1:{}", wrong.port()): {"username": "ci", "token": "not-the-token", "allow_http": true},
    }});
    let creds = ud_core::edge::credentials::GitCredentials::parse(
        &file.to_string(),
        std::path::Path::new("."),
    )?;
    let mut s = Stack::start_with(Duration::from_secs(60), creds, Default::default()).await?;
    let token = s.enroll("private").await?;
    let leaf = s.leaf(&token, s.hub.leaf_port()).await?;
    let work = tempfile::tempdir()?;
    let agent = run_agent(AgentConfig {
        image: None,
        work_dir: work.path().to_owned(),
        labels: BTreeMap::new(),
        ..agent_config(&leaf, &token, "private", Duration::from_millis(500))
    });
    s.node_status(token.node_id, "online", Duration::from_secs(30))
        .await?;
    let submit = |url: String| {
        json!({
            "project": "lab", "code_repo_url": url, "code_commit_id": commit, "env_repo_url": url, "env_commit_id": commit,
            "dockerfile_path": "Dockerfile", "command": ["sh", "run.sh"],
            "resources": {"cpus": 0.5, "memory_mb": 64}, "timeout_seconds": 120
        })
    };

    let id = s.submit_body(submit(good.url("private.git"))).await?;
    let done = s
        .task_state(&id, &["succeeded", "failed"], Duration::from_secs(120))
        .await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    let out = logs(&s, &id).await?;
    assert!(
        out.contains("private-code-ran") && out.contains("env-private"),
        "{out:?}"
    );
    assert!(
        good.refused() >= 1 && good.served() >= 2,
        "the server asked for credentials and was given them"
    );
    // Never in the task's environment (printed by `env` above), its log, its events or any stream.
    assert!(!out.contains(TOKEN), "the token reached the task: {out}");
    let events = s.get(&format!("/api/v1/tasks/{id}/events")).await?;
    assert!(!events.to_string().contains(TOKEN));
    for stream in [
        ud_schemas::streams::TASKS,
        ud_schemas::streams::LOGS,
        edge::EDGE_IN,
        edge::DISPATCH,
    ] {
        let bytes = stream_bytes(&s, stream).await?;
        assert!(!bytes.is_empty(), "{stream} is empty");
        assert!(
            !bytes.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()),
            "the token is stored in {stream}"
        );
    }

    // No credentials for the host, or the wrong ones: the task fails and says why.
    for (server, reason) in [
        (&unknown, "the platform holds none"),
        (&wrong, "refused the credentials"),
    ] {
        let id = s.submit_body(submit(server.url("private.git"))).await?;
        let done = s
            .task_state(&id, &["succeeded", "failed"], Duration::from_secs(120))
            .await?;
        assert_eq!(done["state"], "failed", "{done}");
        assert!(
            done["reason"]
                .as_str()
                .is_some_and(|r| r.contains(reason) && r.contains("fetching code")),
            "expected {reason:?}: {done}"
        );
        assert_eq!(server.served(), 0);
    }
    // The node stays healthy and cached: the first repository runs again without a fetch.
    let again = s.submit_body(submit(good.url("private.git"))).await?;
    let before = good.served();
    let done = s
        .task_state(&again, &["succeeded", "failed"], Duration::from_secs(120))
        .await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(good.served(), before, "a cached commit was fetched again");
    agent.abort();
    Ok(())
}

fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

async fn ran_image_id(s: &Stack, task: &str) -> Result<Value> {
    Ok(s.get(&format!("/api/v1/tasks/{task}")).await?["prepared"]["image_id"].clone())
}

#[tokio::test]
async fn nodes_come_back_after_a_hub_restart_with_what_they_kept() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    let token = s.enroll("zeta").await?;
    let node = s.join("zeta", token, Duration::from_millis(300)).await?;
    s.node_status(node.id, "online", Duration::from_secs(30))
        .await?;
    let task = s.submit("echo during; sleep 3; echo done", 120).await?;
    s.task_state(&task, &["running"], Duration::from_secs(60))
        .await?;
    // The hub dies and comes back while the task runs and finishes.
    s.hub.kill().await?;
    let local = agent_client(&node.leaf, None).await?;
    let mut ended = local
        .subscribe(format!("ud.edge.{}.task.{task}.succeeded", node.id))
        .await?;
    tokio::time::timeout(Duration::from_secs(60), ended.next())
        .await?
        .ok_or_else(|| anyhow!("no end"))?;
    s.hub.restart().await?;
    // Everything reconnects by itself: the node's events arrive, the read model catches up.
    let done = s
        .task_state(&task, &["succeeded"], Duration::from_secs(90))
        .await?;
    assert_eq!(done["exit_code"], 0);
    let out = logs(&s, &task).await?;
    assert!(out.contains("during") && out.contains("done"), "{out:?}");
    // And new work still flows to the node.
    s.runs_ok("echo after the restart", 60, Duration::from_secs(90))
        .await?;
    node.agent.abort();
    Ok(())
}

#[tokio::test]
async fn a_node_low_on_disk_says_so_and_takes_no_new_tasks() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    let token = s.enroll("eta").await?;
    let leaf = s.leaf(&token, s.hub.leaf_port()).await?;
    // No disk is ever big enough.
    let agent = run_agent(AgentConfig {
        min_free_disk_mb: u64::MAX,
        ..agent_config(&leaf, &token, "eta", Duration::from_millis(200))
    });
    let node = s
        .node_status(token.node_id, "online", Duration::from_secs(30))
        .await?;
    let (http, base, admin, id) = (
        s.http.clone(),
        s.base.clone(),
        s.admin.clone(),
        token.node_id,
    );
    let node = if node["low_disk"] == true {
        node
    } else {
        s.until("low disk reported", Duration::from_secs(30), move || {
            let (http, base, admin) = (http.clone(), base.clone(), admin.clone());
            async move {
                let v: Value = http
                    .get(format!("{base}/api/v1/nodes/{id}"))
                    .bearer_auth(&admin)
                    .send()
                    .await?
                    .json()
                    .await?;
                Ok((v["low_disk"] == true).then_some(v))
            }
        })
        .await?
    };
    assert!(node["disk_free_mb"].as_u64().is_some(), "{node}");
    let task = s.submit("echo never", 60).await?;
    // Ten more heartbeats are projected; the task is still waiting.
    let mut beats = s
        .server
        .state
        .commands
        .store()
        .client()
        .subscribe(format!("ud.node.{id}.heartbeat"))
        .await?;
    for _ in 0..10 {
        tokio::time::timeout(Duration::from_secs(10), beats.next()).await?;
    }
    let t = s.get(&format!("/api/v1/tasks/{task}")).await?;
    assert_eq!(t["state"], "pending", "{t}");
    agent.abort();
    Ok(())
}
