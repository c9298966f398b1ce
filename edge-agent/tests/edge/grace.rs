//! A node's link blips: its runs wait `lost_after_seconds` for it
//! (`disconnected`) instead of being lost at the offline timeout.

use std::time::Duration;

use anyhow::{anyhow, Result};
use serde_json::json;

use crate::common::*;

/// A node linked to the hub through a relay the test can cut.
async fn relayed(s: &mut Stack, name: &str) -> Result<(Node, ud_testkit::Relay)> {
    let token = s.enroll(name).await?;
    let link = ud_testkit::Relay::start(s.hub.leaf_port()).await?;
    let node = s
        .join_via(name, token, Duration::from_millis(500), link.port())
        .await?;
    s.node_status(node.id, "online", JOIN).await?;
    Ok((node, link))
}

/// Submits `script` (with a grace of its own, if given; keeping `outputs`)
/// and waits until it runs.
async fn running(
    s: &mut Stack,
    script: &str,
    lost_after_seconds: Option<u64>,
    outputs: &[&str],
) -> Result<String> {
    let mut body = task_body("lab", script, json!({"cpus": 0.5, "memory_mb": 64}));
    body["outputs"] = json!(outputs);
    body["timeout_seconds"] = json!(300);
    if let Some(grace) = lost_after_seconds {
        body["lost_after_seconds"] = json!(grace);
    }
    let id = s.submit_body(body).await?;
    s.task_state(&id, &["running"], Duration::from_secs(60))
        .await?;
    Ok(id)
}

#[tokio::test]
async fn a_blip_longer_than_the_offline_timeout_kills_nothing() -> Result<()> {
    let g = ud_testkit::Garage::start().await?;
    let mut s = Stack::start_full(
        Duration::from_secs(3),
        Default::default(),
        Default::default(),
        Some(crate::files::storage(&g)?),
    )
    .await?;
    let (node, link) = relayed(&mut s, "tau").await?;
    // The grace comes from the task's queue (the platform's default here is none).
    let queue = s
        .http
        .put(format!("{}/api/v1/queues/default", s.base))
        .bearer_auth(&s.admin)
        .json(&json!({"lost_after_seconds": 120}))
        .send()
        .await?;
    assert_eq!(queue.status(), 200);
    let settings: serde_json::Value = queue.json().await?;
    assert_eq!(
        settings["settings"]["lost_after_seconds"], 120,
        "{settings}"
    );
    // The queue's setting reaches the scheduler through the key-value bucket.
    until_logged("lost_after_seconds: Some(120)", Duration::from_secs(10)).await?;
    let id = running(
        &mut s,
        "echo before the blip; sleep 25; echo after the blip | tee result.txt",
        None,
        &["result.txt"],
    )
    .await?;

    // The link drops for longer than the offline timeout.
    link.cut();
    s.node_status(node.id, "offline", Duration::from_secs(30))
        .await?;
    let waiting = s
        .task_state(&id, &["disconnected"], Duration::from_secs(30))
        .await?;
    assert_eq!(waiting["node_id"], node.id.to_string());
    // Its resources stay with the node meanwhile.
    let stats = s.get("/api/v1/stats").await?;
    let held = stats["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["id"] == node.id.to_string())
        .map(|n| n["in_use"]["cpu_millis"].clone());
    assert_eq!(held, Some(json!(500)), "{stats}");
    link.restore();

    let done = s
        .task_state(
            &id,
            &["succeeded", "failed", "pending"],
            Duration::from_secs(90),
        )
        .await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["attempt"], 1, "the run was placed again: {done}");
    let out = logs(&s, &id).await?;
    assert!(
        out.contains("before the blip") && out.contains("after the blip"),
        "{out:?}"
    );
    assert_eq!(out.matches("before the blip").count(), 1, "{out:?}");
    // Its output, written after the blip, is stored.
    assert_eq!(done["outputs"][0]["path"], "result.txt", "{done}");
    let stored = crate::files::download(&s.http, &done["outputs"][0]).await?;
    assert_eq!(stored.as_ref(), b"after the blip\n");
    assert_eq!(
        history(&s, &id).await?,
        vec![
            "task.submitted",
            "task.assigned",
            "task.preparing",
            "task.prepared",
            "task.started",
            "task.disconnected",
            "task.reconnected",
            "task.outputs",
            "task.succeeded"
        ]
    );
    node.agent.abort();
    Ok(())
}

#[tokio::test]
async fn a_node_gone_past_the_grace_loses_its_run_which_is_stopped_on_return() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(3)).await?;
    let (a, link) = relayed(&mut s, "upsilon").await?;
    let id = running(&mut s, "sleep 20; echo finished", Some(4), &[]).await?;
    let b = s.online_node("phi").await?;

    let containers = |node: ud_schemas::NodeId| async move {
        Ok::<usize, anyhow::Error>(
            labelled_containers(ud_edge_agent::docker::LABEL_NODE, node, false)
                .await?
                .len(),
        )
    };
    assert_eq!(containers(a.id).await?, 1);
    link.cut();
    s.task_state(&id, &["disconnected"], Duration::from_secs(30))
        .await?;
    // The grace ends: lost, and placed on the other node.
    let other = b.id.to_string();
    s.task_until(
        &id,
        "the task to run on the other node",
        Duration::from_secs(60),
        move |v| v["state"] == "running" && v["node_id"] == other.as_str(),
    )
    .await?;
    // Cut off for the offline timeout and the grace, the first node has
    // stopped its run itself: never two runs at once.
    assert_eq!(
        containers(a.id).await?,
        0,
        "the cut-off node still runs the task"
    );
    // Its stop waits in its own stream; when it comes back it is refused
    // as stale, and the run elsewhere goes on.
    let local = async_nats::jetstream::with_domain(
        agent_client(&a.leaf, None).await?,
        ud_schemas::edge::domain(&a.id),
    );
    let stop = local
        .get_stream(ud_schemas::edge::stream(&a.id))
        .await?
        .get_last_raw_message_by_subject(&format!("ud.edge.{}.task.{id}.cancelled", a.id))
        .await
        .map_err(|e| anyhow!("the node recorded no stop of its run: {e}"))?;
    assert!(!stop.payload.is_empty());
    link.restore();
    let done = s
        .task_state(
            &id,
            &["succeeded", "failed", "cancelled"],
            Duration::from_secs(60),
        )
        .await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["node_id"], b.id.to_string());
    assert_eq!(done["attempt"], 2);
    assert_eq!(
        history(&s, &id).await?,
        vec![
            "task.submitted",
            "task.assigned",
            "task.prepared",
            "task.started",
            "task.disconnected",
            "task.lost",
            "task.assigned",
            "task.prepared",
            "task.started",
            "task.succeeded"
        ]
    );
    a.agent.abort();
    b.agent.abort();
    Ok(())
}
