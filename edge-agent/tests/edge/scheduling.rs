//! Placement: cordon and drain, lost and stranded tasks, retries, priorities and turns, queue limits.

use std::time::Duration;

use anyhow::{anyhow, Result};
use futures::StreamExt;
use serde_json::{json, Value};
use ud_schemas::NodeId;

use crate::common::*;

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
    assert_eq!(
        history(&s, &task).await?,
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
            ud_core::task::TaskCommand::Assign {
                node_id: gone.id,
                gpus: vec![],
            },
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
    let v = s.node_status(node.id, "online", JOIN).await?;
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
    // Long enough to outlast whatever the test does meanwhile; cancelled below.
    let first = s
        .submit_body(serial("trap 'exit 143' TERM; sleep 120 & wait"))
        .await?;
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
    // The first ends; only then is the second placed.
    s.post(&format!("/api/v1/tasks/{first}/cancel"), json!({}))
        .await?;
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
        "task.cancelled",
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
async fn a_project_over_its_quota_waits_while_others_run_until_it_frees() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    let node = s.online_node("omicron").await?;
    s.http
        .put(format!("{}/api/v1/projects/lab/quota", s.base))
        .bearer_auth(&s.admin)
        .json(&json!({"max_cpu_millis": 500}))
        .send()
        .await?
        .error_for_status()?;
    let body = |project: &str, script: &str| {
        task_body(project, script, json!({"cpus": 0.5, "memory_mb": 32}))
    };
    let first = s.submit_body(body("lab", "sleep 300")).await?;
    s.task_state(&first, &["running"], Duration::from_secs(60))
        .await?;
    let second = s.submit_body(body("lab", "echo second")).await?;
    s.task_until(
        &second,
        "the quota's reason",
        Duration::from_secs(30),
        |v| {
            v["waiting_reason"]
                .as_str()
                .is_some_and(|r| r.contains("project lab holds 0.5 of its quota of 0.5 CPUs"))
        },
    )
    .await?;
    // Another project's task has the node's room and runs meanwhile.
    let other = s.submit_body(body("other", "echo other")).await?;
    let done = s
        .task_state(&other, &["succeeded", "failed"], Duration::from_secs(60))
        .await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    let quota = s.get("/api/v1/projects/lab/quota").await?;
    assert_eq!(quota["usage"]["tasks"], 1, "{quota}");
    assert_eq!(quota["usage"]["cpu_millis"], 500);
    assert_eq!(
        s.get(&format!("/api/v1/tasks/{second}")).await?["state"],
        "pending"
    );
    // The first ends: the second goes.
    s.post(&format!("/api/v1/tasks/{first}/cancel"), json!({}))
        .await?;
    let done = s
        .task_state(&second, &["succeeded", "failed"], Duration::from_secs(60))
        .await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    node.agent.abort();
    Ok(())
}

#[tokio::test]
async fn tasks_run_after_the_tasks_they_name() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    let node = s.online_node("xi").await?;
    let first = s.submit("sleep 3; echo first done", 120).await?;
    let failing = s.submit("exit 3", 120).await?;
    let after = |script: &str, deps: Value| {
        let mut body = task_body("lab", script, json!({"cpus": 0.5, "memory_mb": 64}));
        body["after"] = deps;
        body
    };
    let next = s
        .submit_body(after("echo next", json!([{"task": first}])))
        .await?;
    let blocked = s
        .submit_body(after("echo never", json!([{"task": failing}])))
        .await?;
    let cleanup = s
        .submit_body(after(
            "echo cleanup",
            json!([{"task": failing, "when": "any"}]),
        ))
        .await?;
    // Waits, saying for what, while the first runs.
    let waiting = s
        .task_until(
            &next,
            "a reason naming the first task",
            Duration::from_secs(30),
            {
                let first = first.clone();
                move |v| {
                    v["waiting_reason"]
                        .as_str()
                        .is_some_and(|r| r.contains(&first))
                }
            },
        )
        .await?;
    assert_eq!(waiting["state"], "pending", "{waiting}");
    let done = s
        .task_state(&next, &["succeeded", "failed"], Duration::from_secs(60))
        .await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    let first_done = s.get(&format!("/api/v1/tasks/{first}")).await?;
    assert_eq!(first_done["state"], "succeeded");
    // It started only after the first had ended (stream order).
    let started = s.seq_of(&next, "task.started").await?;
    let ended = s.seq_of(&first, "task.succeeded").await?;
    assert!(
        started > ended && ended > 0,
        "started at {started}, the first ended at {ended}"
    );
    // After a failure: `success` fails at once, saying why; `any` runs.
    let never = s
        .task_state(&blocked, &["succeeded", "failed"], Duration::from_secs(60))
        .await?;
    assert_eq!(never["state"], "failed", "{never}");
    assert!(
        never["reason"]
            .as_str()
            .is_some_and(|r| r.contains(&failing)),
        "{never}"
    );
    assert!(!logs(&s, &blocked).await?.contains("never"));
    let ran = s
        .task_state(&cleanup, &["succeeded", "failed"], Duration::from_secs(60))
        .await?;
    assert_eq!(ran["state"], "succeeded", "{ran}");
    // A task of another project, or none, cannot be named.
    let resp = s
        .http
        .post(format!("{}/api/v1/tasks", s.base))
        .bearer_auth(&s.admin)
        .json(&{
            let mut b = after("echo x", json!([{"task": first}]));
            b["project"] = json!("other");
            b
        })
        .send()
        .await?;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await?;
    assert_eq!(v["fields"][0]["field"], "after[0].task", "{v}");
    node.agent.abort();
    Ok(())
}
