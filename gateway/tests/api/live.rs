//! The live WebSocket on real servers: events a token may see, in order,
//! resumable from a stream sequence; a task's log followed and resumed.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::common::{task, Stack};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Every wait is bounded: a missing message fails the test instead of hanging it.
const WAIT: Duration = Duration::from_secs(20);

pub(crate) async fn connect(s: &Stack, hello: Value) -> Result<Ws> {
    let url = s.base.replacen("http://", "ws://", 1) + "/api/v1/live";
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    ws.send(Message::text(hello.to_string())).await?;
    Ok(ws)
}

/// The next JSON message (pings and pongs skipped).
pub(crate) async fn next(ws: &mut Ws) -> Result<Value> {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .map_err(|_| anyhow!("no message within {WAIT:?}"))?
            .ok_or_else(|| anyhow!("connection ended"))??;
        match msg {
            Message::Text(t) => return Ok(serde_json::from_str(t.as_str())?),
            Message::Close(f) => bail!("closed: {f:?}"),
            _ => {}
        }
    }
}

/// The close frame's code, after the error message that precedes it.
pub(crate) async fn closed_with(ws: &mut Ws) -> Result<(Value, u16)> {
    let error = next(ws).await?;
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .map_err(|_| anyhow!("no close within {WAIT:?}"))?
            .ok_or_else(|| anyhow!("ended without a close frame"))??;
        if let Message::Close(Some(f)) = msg {
            return Ok((error, u16::from(f.code)));
        }
    }
}

async fn submit(s: &Stack, token: &str, project: &str) -> Result<String> {
    let v: Value = s
        .http
        .post(s.url("/api/v1/tasks"))
        .bearer_auth(token)
        .json(&task(project))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(v["task_id"].as_str().unwrap_or_default().to_owned())
}

async fn cancel(s: &Stack, token: &str, id: &str) -> Result<()> {
    s.http
        .post(s.url(&format!("/api/v1/tasks/{id}/cancel")))
        .bearer_auth(token)
        .send()
        .await?
        .error_for_status()?;
    Ok(())
}

#[tokio::test]
async fn task_events_arrive_live_only_for_visible_projects_and_resume_after_a_reconnect(
) -> Result<()> {
    let s = Stack::start().await?;
    let lab = s.token(&["lab"]).await?;
    let mut ws = connect(&s, json!({"token": lab, "tasks": {}, "nodes": {}})).await?;
    let ready = next(&mut ws).await?;
    assert_eq!(ready["type"], "ready");
    let start = ready["tasks_seq"].as_u64().unwrap_or(u64::MAX);

    let other = submit(&s, &s.admin, "other").await?;
    let mine = submit(&s, &lab, "lab").await?;
    cancel(&s, &lab, &mine).await?;
    cancel(&s, &s.admin, &other).await?;

    // In stream order, and nothing of project `other` in between.
    let first = next(&mut ws).await?;
    assert_eq!(first["type"], "event");
    assert_eq!(first["stream"], "tasks");
    assert_eq!(first["event_type"], "task.submitted");
    assert_eq!(first["task_id"], mine.as_str());
    assert_eq!(first["project"], "lab");
    assert_eq!(
        first["data"]["spec"]["command"],
        json!(["python", "train.py"])
    );
    assert!(first["seq"].as_u64().unwrap_or(0) > start);
    let second = next(&mut ws).await?;
    assert_eq!(second["event_type"], "task.cancelled");
    assert_eq!(second["task_id"], mine.as_str());
    let last_seen = second["seq"].as_u64().unwrap_or(0);
    assert!(last_seen > first["seq"].as_u64().unwrap_or(0));
    ws.close(None).await?;

    // While away: one more task. Resuming after the last sequence seen gives it first.
    let missed = submit(&s, &lab, "lab").await?;
    let mut ws = connect(&s, json!({"token": lab, "tasks": {"after": last_seen}})).await?;
    assert_eq!(next(&mut ws).await?["type"], "ready");
    let again = next(&mut ws).await?;
    assert_eq!(again["task_id"], missed.as_str());
    assert_eq!(again["event_type"], "task.submitted");

    // An admin token sees every project's events, from the start of the stream.
    let mut all = connect(&s, json!({"token": s.admin, "tasks": {"after": 0}})).await?;
    assert_eq!(next(&mut all).await?["type"], "ready");
    let mut projects = Vec::new();
    for _ in 0..5 {
        projects.push(next(&mut all).await?["project"].clone());
    }
    assert_eq!(
        projects,
        vec![
            json!("other"),
            json!("lab"),
            json!("lab"),
            json!("other"),
            json!("lab")
        ]
    );
    Ok(())
}

#[tokio::test]
async fn ready_means_the_read_model_has_everything_before_it() -> Result<()> {
    let s = Stack::start().await?;
    let lab = s.token(&["lab"]).await?;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(submit(&s, &lab, "lab").await?);
    }
    let mut ws = connect(&s, json!({"token": lab, "tasks": {}})).await?;
    let ready = next(&mut ws).await?;
    assert_eq!(ready["type"], "ready");
    let page: Value = s
        .http
        .get(s.url("/api/v1/tasks?limit=100"))
        .bearer_auth(&lab)
        .send()
        .await?
        .json()
        .await?;
    let listed: Vec<&str> = page["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["id"].as_str())
        .collect();
    for id in &ids {
        assert!(listed.contains(&id.as_str()), "{id} missing after ready");
    }
    Ok(())
}

#[tokio::test]
async fn a_tasks_log_follows_and_resumes_without_gaps() -> Result<()> {
    let s = Stack::start().await?;
    let lab = s.token(&["lab"]).await?;
    let id = submit(&s, &lab, "lab").await?;
    let js = s.server.state.commands.store().jetstream().clone();
    let publish = |n: u32| {
        let js = js.clone();
        let id = id.clone();
        async move {
            let chunk = ud_schemas::dispatch::LogChunk {
                at: 1_700_000_000_000 + i64::from(n),
                attempt: 1,
                stream: "stdout".into(),
                text: format!("line {n}\n"),
            };
            let payload = ud_schemas::dispatch::to_cbor(&chunk)?;
            js.publish(format!("ud.log.{id}"), payload.into())
                .await?
                .await?;
            anyhow::Ok(())
        }
    };
    publish(1).await?;
    publish(2).await?;
    let hello = json!({"token": lab, "task_id": id, "tasks": {"after": 0}, "log": {}});
    let mut ws = connect(&s, hello).await?;
    assert_eq!(next(&mut ws).await?["type"], "ready");
    // Task events and log chunks share the connection; sort them apart.
    let (mut lines, mut events) = (Vec::new(), Vec::new());
    while lines.len() < 2 || events.is_empty() {
        let m = next(&mut ws).await?;
        match m["type"].as_str() {
            Some("log") => lines.push(m),
            Some("event") => events.push(m),
            other => bail!("unexpected {other:?}"),
        }
    }
    assert_eq!(events[0]["event_type"], "task.submitted");
    assert_eq!(lines[0]["text"], "line 1\n");
    assert_eq!(lines[1]["text"], "line 2\n");
    let first_seq = lines[0]["seq"].as_u64().unwrap_or(0);
    ws.close(None).await?;

    publish(3).await?;
    let hello = json!({"token": lab, "task_id": id, "log": {"after": first_seq}});
    let mut ws = connect(&s, hello).await?;
    assert_eq!(next(&mut ws).await?["type"], "ready");
    let texts = [
        next(&mut ws).await?["text"].clone(),
        next(&mut ws).await?["text"].clone(),
    ];
    assert_eq!(texts, [json!("line 2\n"), json!("line 3\n")]);
    // Live: a chunk written now arrives on the open connection.
    publish(4).await?;
    assert_eq!(next(&mut ws).await?["text"], "line 4\n");

    // Another project's token cannot follow this task.
    let other = s.token(&["other"]).await?;
    let mut ws = connect(&s, json!({"token": other, "task_id": id, "log": {}})).await?;
    let (error, code) = closed_with(&mut ws).await?;
    assert_eq!(error["error"], "not_found");
    assert_eq!(code, 4400);
    Ok(())
}

#[tokio::test]
async fn bad_tokens_and_bad_first_messages_are_refused_with_a_reason() -> Result<()> {
    let s = Stack::start().await?;
    let mut ws = connect(&s, json!({"token": "nope", "tasks": {}})).await?;
    let (error, code) = closed_with(&mut ws).await?;
    assert_eq!(
        (error["error"].as_str(), code),
        (Some("unauthorized"), 4401)
    );

    let mut ws = connect(&s, json!({"tasks": {}})).await?;
    let (error, code) = closed_with(&mut ws).await?;
    assert_eq!(code, 4401);
    assert!(error["message"].as_str().unwrap_or("").contains("token"));

    let mut ws = connect(&s, json!({"token": s.admin, "tasks": {"from": 3}})).await?;
    let (error, code) = closed_with(&mut ws).await?;
    assert_eq!(code, 4400);
    assert!(
        error["message"].as_str().unwrap_or("").contains("from"),
        "{error}"
    );

    let mut ws = connect(&s, json!({"token": s.admin, "log": {}})).await?;
    let (_, code) = closed_with(&mut ws).await?;
    assert_eq!(code, 4400);

    // A token in the upgrade request's header is enough.
    let url = s.base.replacen("http://", "ws://", 1) + "/api/v1/live";
    let mut req = url.into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {}", s.admin).parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
    ws.send(Message::text(json!({"nodes": {"after": 0}}).to_string()))
        .await?;
    assert_eq!(next(&mut ws).await?["type"], "ready");
    Ok(())
}

#[tokio::test]
async fn rerun_submits_the_same_spec_as_a_new_task() -> Result<()> {
    let s = Stack::start().await?;
    let lab = s.token(&["lab"]).await?;
    let id = submit(&s, &lab, "lab").await?;
    let resp = s
        .http
        .post(s.url(&format!("/api/v1/tasks/{id}/rerun?wait=projected")))
        .bearer_auth(&lab)
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let new_id = resp.json::<Value>().await?["task_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_ne!(new_id, id);
    let get = |id: String| {
        let (http, url, token) = (
            s.http.clone(),
            s.url(&format!("/api/v1/tasks/{id}")),
            lab.clone(),
        );
        async move {
            anyhow::Ok(
                http.get(url)
                    .bearer_auth(token)
                    .send()
                    .await?
                    .json::<Value>()
                    .await?,
            )
        }
    };
    let (old, new) = (get(id.clone()).await?, get(new_id).await?);
    assert_eq!(old["spec"], new["spec"]);
    assert_eq!(new["state"], "pending");

    let other = s.token(&["other"]).await?;
    let resp = s
        .http
        .post(s.url(&format!("/api/v1/tasks/{id}/rerun")))
        .bearer_auth(&other)
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    Ok(())
}
