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

/// Agents starting together on one engine end with one network of each
/// name, even where the engine accepts several of one name and one is left
/// over from before: duplicates make the name ambiguous, so no container can
/// join it, and each takes one of the engine's few address pools.
#[tokio::test]
async fn agents_starting_together_share_one_network_of_each_name() -> Result<()> {
    use bollard::query_parameters::ListNetworksOptions;
    use ud_edge_agent::docker::Executor;

    let host = std::env::var("DOCKER_HOST").ok();
    let name = format!("ud-test-{:08x}", rand::random::<u32>());
    let engine = Executor::connect(host.as_deref(), ud_schemas::NodeId::new()).await?;
    let docker = engine.client();
    let count = || async {
        let list = docker
            .list_networks(Some(ListNetworksOptions {
                filters: Some([("name".to_owned(), vec![name.clone()])].into()),
            }))
            .await?;
        anyhow::Ok(
            list.iter()
                .filter(|n| n.name.as_deref() == Some(name.as_str()))
                .count(),
        )
    };
    // One made before, plus a duplicate where the engine allows it.
    for _ in 0..2 {
        let _ = docker
            .create_network(bollard::models::NetworkCreateRequest {
                name: name.clone(),
                internal: Some(true),
                ..Default::default()
            })
            .await;
    }
    let before = count().await?;
    let mut starting = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let host = host.clone();
        let name = name.clone();
        starting.spawn(async move {
            Executor::connect(host.as_deref(), ud_schemas::NodeId::new())
                .await?
                .ensure_sessions_network(&name)
                .await?;
            anyhow::Ok(())
        });
    }
    while let Some(done) = starting.join_next().await {
        done??;
    }
    let after = count().await?;
    let _ = docker.remove_network(&name).await;
    assert!(before >= 1, "{before}");
    assert_eq!(
        after, 1,
        "networks named {name}: {before} before, {after} after"
    );
    Ok(())
}
