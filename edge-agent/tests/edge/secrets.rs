//! Project secrets end to end: set through the API, given to one run as an
//! environment variable, and afterwards found nowhere: no stream (of the
//! hub or the node's leaf server), no table, no log. A backup is those
//! streams and tables, so it holds no value either.

use std::time::Duration;

use anyhow::Result;
use futures::StreamExt;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::common::*;

/// Streams (and their subjects, headers and payloads) that hold `needle`,
/// of every stream `js` sees.
async fn streams_holding(
    js: &async_nats::jetstream::Context,
    needle: &[u8],
) -> Result<Vec<String>> {
    let has = |hay: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    let mut names = js.stream_names();
    let mut found = Vec::new();
    let mut scanned = 0;
    while let Some(name) = names.next().await {
        let name = name?;
        let mut stream = js.get_stream(&name).await?;
        let info = stream.info().await?.clone();
        for seq in info.state.first_sequence..=info.state.last_sequence {
            let Ok(m) = stream.get_raw_message(seq).await else {
                continue; // deleted
            };
            scanned += 1;
            let headers = format!("{:?}", m.headers);
            if has(m.subject.as_bytes()) || has(&m.payload) || has(headers.as_bytes()) {
                found.push(format!("{name} #{seq} ({})", m.subject));
            }
        }
    }
    anyhow::ensure!(scanned > 0, "no message was scanned");
    Ok(found)
}

/// Tables (as `schema.table`) with a row whose text holds `needle`.
async fn tables_holding(pg: &tokio_postgres::Client, needle: &str) -> Result<Vec<String>> {
    let tables = pg
        .query(
            "SELECT format('%I.%I', table_schema, table_name) FROM information_schema.tables
             WHERE table_type = 'BASE TABLE' AND table_schema NOT IN ('pg_catalog', 'information_schema')",
            &[],
        )
        .await?;
    anyhow::ensure!(!tables.is_empty(), "no table to scan");
    let mut found = Vec::new();
    for t in tables {
        let name: String = t.get(0);
        let n: i64 = pg
            .query_one(
                &format!("SELECT count(*) FROM {name} t WHERE strpos(t::text, $1) > 0"),
                &[&needle],
            )
            .await?
            .get(0);
        if n > 0 {
            found.push(name);
        }
    }
    Ok(found)
}

#[tokio::test]
async fn a_run_gets_its_secret_and_the_value_is_nowhere_afterwards() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    let node = s.online_node("kappa").await?;
    let value = format!("wandb-{}", uuid::Uuid::new_v4().simple());
    let set = s
        .http
        .put(format!(
            "{}/api/v1/projects/lab/secrets/WANDB_API_KEY",
            s.base
        ))
        .bearer_auth(&s.admin)
        .json(&json!({ "value": value }))
        .send()
        .await?;
    assert_eq!(set.status(), 200);
    let set: serde_json::Value = set.json().await?;
    assert_eq!(set["version"], 1, "{set}");

    // The run prints a digest of what it got, never the value.
    let mut body = task_body(
        "lab",
        "printf %s \"$WANDB_API_KEY\" | sha256sum",
        json!({"cpus": 0.5, "memory_mb": 64}),
    );
    body["secrets"] = json!(["WANDB_API_KEY"]);
    let id = s.submit_body(body).await?;
    let done = s
        .task_state(&id, &["succeeded", "failed"], Duration::from_secs(60))
        .await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["node_id"], node.id.to_string());
    let digest = hex::encode(Sha256::digest(value.as_bytes()));
    assert!(
        logs(&s, &id).await?.contains(&digest),
        "the run did not get the value"
    );
    // What the task shows names the secret only.
    let shown = s.get(&format!("/api/v1/tasks/{id}")).await?;
    assert_eq!(
        shown["spec"]["secrets"],
        json!(["WANDB_API_KEY"]),
        "{shown}"
    );

    // Nowhere: no stream of the hub or of the node's leaf server...
    let hub = async_nats::jetstream::new(
        async_nats::ConnectOptions::with_user_and_password("platform".into(), PLATFORM_PW.into())
            .connect(format!("127.0.0.1:{}", s.hub.port()))
            .await?,
    );
    let on_hub = streams_holding(&hub, value.as_bytes()).await?;
    assert!(on_hub.is_empty(), "the value is in {on_hub:?}");
    let leaf = async_nats::jetstream::new(agent_client(&node.leaf, None).await?);
    let on_leaf = streams_holding(&leaf, value.as_bytes()).await?;
    assert!(on_leaf.is_empty(), "the value is in {on_leaf:?}");
    // ...no table...
    let pg = s.pg.connect().await?;
    let rows = tables_holding(&pg, &value).await?;
    assert!(rows.is_empty(), "the value is in {rows:?}");
    // ...and no log line of the main server or the agent.
    assert!(
        logged("secrets handed out"),
        "the capture saw no secret request"
    );
    assert!(!logged(&value), "the value is in a log");
    // The history records the secret's version only.
    let secrets = s.get("/api/v1/projects/lab/secrets").await?;
    assert_eq!(secrets["secrets"][0]["version"], 1, "{secrets}");
    node.agent.abort();
    Ok(())
}

#[tokio::test]
async fn a_run_whose_secret_was_deleted_fails_and_says_which() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    let put = |name: &str| {
        s.http
            .put(format!("{}/api/v1/projects/lab/secrets/{name}", s.base))
            .bearer_auth(&s.admin)
            .json(&json!({"value": "v"}))
            .send()
    };
    assert_eq!(put("HF_TOKEN").await?.status(), 200);
    // Submitted while it was set; deleted before any node could run it.
    let mut body = task_body("lab", "echo ran", json!({"cpus": 0.5, "memory_mb": 64}));
    body["secrets"] = json!(["HF_TOKEN"]);
    let id = s.submit_body(body).await?;
    let deleted = s
        .http
        .delete(format!("{}/api/v1/projects/lab/secrets/HF_TOKEN", s.base))
        .bearer_auth(&s.admin)
        .send()
        .await?;
    assert_eq!(deleted.status(), 200);
    let node = s.online_node("lambda").await?;
    let done = s
        .task_state(&id, &["succeeded", "failed"], Duration::from_secs(60))
        .await?;
    assert_eq!(done["state"], "failed", "{done}");
    let reason = done["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("HF_TOKEN") && reason.contains("not set"),
        "{done}"
    );
    assert!(!logs(&s, &id).await?.contains("ran"));
    node.agent.abort();
    Ok(())
}

/// Asks for a run's secrets as `node`'s agent does, on its own leaf server.
async fn ask(
    leaf: &ud_testkit::NatsServer,
    node: ud_schemas::NodeId,
    task_id: ud_schemas::TaskId,
    attempt: u32,
) -> Result<ud_schemas::dispatch::SecretsReply> {
    let client = agent_client(leaf, Some(node)).await?;
    let req = ud_schemas::dispatch::SecretsRequest { task_id, attempt };
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(
            ud_schemas::edge::secrets_subject(&node),
            ud_schemas::dispatch::to_cbor(&req)?.into(),
        ),
    )
    .await??;
    Ok(ud_schemas::dispatch::from_cbor(
        &reply.payload,
        "secrets-reply",
    )?)
}

#[tokio::test]
async fn only_the_node_running_the_attempt_gets_the_values() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    let a = s.online_node("mu").await?;
    let b = s.online_node("nu").await?;
    let put = s
        .http
        .put(format!("{}/api/v1/projects/lab/secrets/TOKEN", s.base))
        .bearer_auth(&s.admin)
        .json(&json!({"value": "only-for-the-run"}))
        .send()
        .await?;
    assert_eq!(put.status(), 200);
    let mut body = task_body("lab", "sleep 30", json!({"cpus": 0.5, "memory_mb": 64}));
    body["secrets"] = json!(["TOKEN"]);
    let id = s.submit_body(body).await?;
    let running = s
        .task_state(&id, &["running"], Duration::from_secs(60))
        .await?;
    let (runner, other) = if running["node_id"] == a.id.to_string() {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let task: ud_schemas::TaskId = id.parse()?;
    use ud_schemas::dispatch::SecretsReply;
    assert!(matches!(
        ask(&runner.leaf, runner.id, task, 1).await?,
        SecretsReply::Values { values } if values.len() == 1 && values[0].value == "only-for-the-run"
    ));
    // Another node, or an attempt that is not the current one, gets nothing.
    assert!(matches!(
        ask(&other.leaf, other.id, task, 1).await?,
        SecretsReply::Denied { .. }
    ));
    assert!(matches!(
        ask(&runner.leaf, runner.id, task, 2).await?,
        SecretsReply::Denied { .. }
    ));
    // Nor may a node ask on another node's subject.
    let foreign_client = agent_client(&other.leaf, Some(other.id)).await?;
    let foreign = foreign_client.request(
        ud_schemas::edge::secrets_subject(&runner.id),
        bytes::Bytes::new(),
    );
    let refused = tokio::time::timeout(Duration::from_secs(5), foreign).await;
    assert!(
        !matches!(refused, Ok(Ok(_))),
        "a node was answered on another node's subject"
    );
    s.post(
        &format!("/api/v1/tasks/{id}/cancel"),
        json!({"reason": "done"}),
    )
    .await?;
    a.agent.abort();
    b.agent.abort();
    Ok(())
}
