//! What a task's container may reach: nothing (`none`, the default), or the
//! outside through a private bridge (`egress`, where the node's owner allows
//! it), never the node's own services. The node here is a Docker engine in a
//! network namespace of its own, beside an "internet" in another.

use std::time::Duration;

use anyhow::Result;
use serde_json::json;
use ud_edge_agent::info::Offer;
use ud_edge_agent::AgentConfig;
use ud_schemas::spec::NetworkMode;
use ud_testkit::IsolatedDocker;

use crate::common::*;

fn fetch(url: &str, network: &str) -> serde_json::Value {
    let mut body = task_body(
        "lab",
        &format!("timeout 5 wget -q -O- {url}"),
        json!({"cpus": 0.5, "memory_mb": 64}),
    );
    body["network"] = json!(network);
    body
}

#[tokio::test]
async fn egress_reaches_the_internet_but_not_the_host_and_none_reaches_nothing() -> Result<()> {
    let iso = IsolatedDocker::start().await?;
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    let token = s.enroll("open").await?;
    let leaf = s.leaf(&token, s.hub.leaf_port()).await?;
    let agent = run_agent(AgentConfig {
        docker_host: Some(iso.docker_host.clone()),
        offer: Offer {
            networks: vec![NetworkMode::Egress],
            ..Offer::default()
        },
        ..agent_config(&leaf, &token, "open", Duration::from_millis(500))
    });
    s.node_status(token.node_id, "online", JOIN).await?;
    let cases = [
        (iso.internet.as_str(), "egress", "succeeded"),
        (iso.internet.as_str(), "none", "failed"),
        (iso.host_uplink.as_str(), "egress", "failed"),
        (iso.host_loopback.as_str(), "egress", "failed"),
    ];
    let mut ids = Vec::new();
    for (url, network, _) in &cases {
        ids.push(s.submit_body(fetch(url, network)).await?);
    }
    for (id, (url, network, want)) in ids.iter().zip(cases) {
        let done = s
            .task_state(id, &["succeeded", "failed"], Duration::from_secs(60))
            .await?;
        assert_eq!(done["state"], want, "{network} -> {url}: {done}");
    }
    assert!(logs(&s, &ids[0]).await?.contains("hello from the internet"));
    agent.abort();
    Ok(())
}

#[tokio::test]
async fn an_egress_task_never_goes_to_a_node_that_does_not_allow_it() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    s.online_node("closed").await?;
    let id = s
        .submit_body(fetch("http://10.99.0.2:8080/", "egress"))
        .await?;
    let done = s
        .task_state(&id, &["failed"], Duration::from_secs(30))
        .await?;
    assert!(
        done["reason"]
            .as_str()
            .is_some_and(|r| r.contains("network")),
        "{done}"
    );
    Ok(())
}
