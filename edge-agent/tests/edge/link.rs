//! The node's link to the hub: always encrypted. TLS on the leaf-node port
//! (every other test joins that way), or a WebSocket through a real HTTPS
//! proxy; a node that cannot verify the hub stays out and says why.

use std::time::Duration;

use anyhow::Result;
use tokio::io::AsyncReadExt;
use ud_schemas::edge::HubLink;
use ud_testkit::{NatsOptions, NatsServer, Proxy, TestCa};

use crate::common::*;

#[tokio::test]
async fn the_hub_requires_tls_and_a_node_that_cannot_verify_it_stays_out() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    // The leaf-node port asks every peer for TLS before anything else.
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", s.hub.leaf_port())).await?;
    let mut info = vec![0u8; 4096];
    let n = raw.read(&mut info).await?;
    let info = String::from_utf8_lossy(&info[..n]);
    assert!(info.contains("\"tls_required\":true"), "{info}");

    // A node trusting another authority refuses the hub and logs why.
    let token = s.enroll("mallory").await?;
    let other = TestCa::new("another CA")?;
    let link = HubLink::Tls {
        host: "127.0.0.1".into(),
        port: s.hub.leaf_port(),
    };
    let wrong = leaf_server(&token, &link, Some(&other.ca_file())).await?;
    wrong
        .until_logged(
            "certificate signed by unknown authority",
            Duration::from_secs(30),
        )
        .await?;
    drop(wrong);

    // A hub whose certificate expired is refused as well.
    let stale = NatsServer::start_with(NatsOptions {
        hub: true,
        accounts: Some(initial_accounts()?),
        leaf_tls: Some(s.ca.expired_server()?),
        ..Default::default()
    })
    .await?;
    let to_stale = HubLink::Tls {
        host: "127.0.0.1".into(),
        port: stale.leaf_port(),
    };
    let leaf = leaf_server(&token, &to_stale, Some(&s.ca.ca_file())).await?;
    leaf.until_logged("certificate has expired", Duration::from_secs(30))
        .await?;
    drop(leaf);

    // The agent's own tool will not write a plain link unless told to.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_unidesk-edge"))
        .args([
            "leaf-config",
            "--hub",
            "nats-leaf://127.0.0.1:7422",
            "--agent-password",
            "x",
        ])
        .env("UD_NODE_TOKEN", token.encode())
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in clear") && err.contains("--allow-plain-link"),
        "{err}"
    );

    // With the hub's authority, the same node joins.
    let leaf = s.leaf(&token, s.hub.leaf_port()).await?;
    let agent = spawn_agent(&leaf, &token, "mallory", Duration::from_millis(500));
    s.node_status(token.node_id, "online", JOIN).await?;
    agent.abort();
    Ok(())
}

#[tokio::test]
async fn a_node_joined_over_websocket_through_an_https_proxy_runs_a_task() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    // Only the proxy's HTTPS port is in the way: /leafnode goes to the hub.
    let proxy = Proxy::start(Some(&s.ca.server()?), &[("/leafnode", s.hub.ws_port())]).await?;
    let token = s.enroll("sigma").await?;
    let link = HubLink::WebSocket {
        host: "localhost".into(),
        port: proxy.port,
    };
    let leaf = leaf_server(&token, &link, Some(&s.ca.ca_file())).await?;
    let agent = spawn_agent(&leaf, &token, "sigma", Duration::from_millis(500));
    s.node_status(token.node_id, "online", JOIN).await?;
    let id = s.submit("echo over the websocket", 60).await?;
    let done = s
        .task_state(&id, &["succeeded", "failed"], Duration::from_secs(60))
        .await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["node_id"], token.node_id.to_string());
    assert!(logs(&s, &id).await?.contains("over the websocket"));
    // The hub sees it as a WebSocket leaf.
    let leafz: serde_json::Value = reqwest::get(format!("{}/leafz", s.hub.monitor_url()))
        .await?
        .json()
        .await?;
    assert_eq!(leafz["leafnodes"], 1, "{leafz}");
    agent.abort();
    Ok(())
}
