//! Project webhooks: refused field by field when bad, delivered signed,
//! tried again when the receiver fails, each delivery logged.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use futures::StreamExt;
use reqwest::StatusCode as Status;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use ud_core::task::TaskCommand;
use ud_schemas::{NodeId, TaskId};

use crate::common::{task, Stack};

/// What a receiver got: its path, headers and body.
type Got = (String, HeaderMap, Vec<u8>);

/// A receiver on 127.0.0.1 that fails the first request to `/ci` and
/// every request to `/dead` (500), and takes every other.
async fn receiver() -> Result<(String, mpsc::UnboundedReceiver<Got>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let failed_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let app = axum::Router::new()
        .route(
            "/{path}",
            axum::routing::post(
                |State((tx, failed)): State<(
                    mpsc::UnboundedSender<Got>,
                    Arc<std::sync::atomic::AtomicBool>,
                )>,
                 Path(path): Path<String>,
                 headers: HeaderMap,
                 body: axum::body::Bytes| async move {
                    let _ = tx.send((path.clone(), headers, body.to_vec()));
                    if path == "dead"
                        || path == "ci" && !failed.swap(true, std::sync::atomic::Ordering::SeqCst)
                    {
                        StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        StatusCode::NO_CONTENT
                    }
                },
            ),
        )
        .with_state((tx, failed_once));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((base, rx))
}

/// Submits a task of `lab` that fails (as a node would say); its id.
async fn a_task_fails(s: &Stack, lab: &str, reason: &str) -> Result<TaskId> {
    let mut body = task("lab");
    body["retry"] = json!({"max_attempts": 1});
    let v: Value = s
        .http
        .post(s.url("/api/v1/tasks?wait=projected"))
        .bearer_auth(lab)
        .json(&body)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id: TaskId = v["task_id"].as_str().unwrap_or_default().parse()?;
    let node = NodeId::new();
    for command in [
        TaskCommand::Assign {
            node_id: node,
            gpus: vec![],
        },
        TaskCommand::Start {
            node_id: node,
            attempt: 1,
        },
        TaskCommand::Fail {
            node_id: node,
            exit_code: Some(3),
            reason: reason.into(),
            attempt: Some(1),
        },
    ] {
        s.node_says(id, command).await?;
    }
    Ok(id)
}

/// Follows the log of a webhook's deliveries (`UD_WEBHOOK_LOG`).
async fn log_of(s: &Stack, name: &str) -> Result<async_nats::Subscriber> {
    let client = s.server.state.commands.store().client();
    let sub = client
        .subscribe(ud_notify::deliver::log_subject("lab", name))
        .await?;
    client.flush().await?;
    Ok(sub)
}

/// A webhook's delivery log through the API, once `log` saw an entry.
async fn logged(
    s: &Stack,
    lab: &str,
    name: &str,
    log: &mut async_nats::Subscriber,
) -> Result<Value> {
    tokio::time::timeout(Duration::from_secs(30), log.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("the log ended"))?;
    Ok(s.http
        .get(s.url(&format!("/api/v1/projects/lab/webhooks/{name}/deliveries")))
        .bearer_auth(lab)
        .send()
        .await?
        .json()
        .await?)
}

#[tokio::test]
async fn webhooks_are_refused_by_field_delivered_signed_retried_and_logged() -> Result<()> {
    let s = Stack::start().await?;
    let lab = s.token(&["lab"]).await?;
    let other = s.token(&["other"]).await?;
    let (base, mut got) = receiver().await?;
    let create = |token: String, body: Value| {
        let (http, url) = (s.http.clone(), s.url("/api/v1/projects/lab/webhooks"));
        async move { anyhow::Ok(http.post(url).bearer_auth(token).json(&body).send().await?) }
    };

    // Bad input: every bad field named, nothing stored.
    let resp = create(
        lab.clone(),
        json!({"name": "Bad!", "url": "ftp://example.org/x", "events": ["task.exploded"], "format": "xml"}),
    )
    .await?;
    assert_eq!(resp.status(), Status::BAD_REQUEST);
    let v: Value = resp.json().await?;
    let fields: Vec<&str> = v["fields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["field"].as_str())
        .collect();
    assert_eq!(fields, ["name", "url", "events", "format"], "{v}");
    let resp = create(
        other.clone(),
        json!({"name": "x", "url": base, "events": ["task.failed"]}),
    )
    .await?;
    assert_eq!(resp.status(), Status::NOT_FOUND);
    let list: Value = s
        .http
        .get(s.url("/api/v1/projects/lab/webhooks"))
        .bearer_auth(&lab)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(list, json!([]));

    // Two webhooks on failures: the event itself, and a Slack line.
    let resp = create(
        lab.clone(),
        json!({"name": "ci", "url": format!("{base}/ci"), "events": ["task.failed"]}),
    )
    .await?;
    assert_eq!(resp.status(), Status::CREATED);
    let ci: Value = resp.json().await?;
    let secret = ci["secret"].as_str().unwrap_or_default().to_owned();
    assert_eq!(secret.len(), 64, "{ci}");
    let resp = create(
        lab.clone(),
        json!({"name": "ci", "url": format!("{base}/ci"), "events": ["task.failed"]}),
    )
    .await?;
    assert_eq!(resp.status(), Status::CONFLICT);
    let resp = create(
        lab.clone(),
        json!({"name": "chat", "url": format!("{base}/chat"), "events": ["task.failed", "task.succeeded"], "format": "slack"}),
    )
    .await?;
    assert_eq!(resp.status(), Status::CREATED);

    // A task fails (as a node would say).
    let mut ci_log = log_of(&s, "ci").await?;
    let id = a_task_fails(&s, &lab, "exited with 3").await?;

    // `/ci` refused the first try: three requests in all.
    let mut by_path: std::collections::BTreeMap<String, Vec<(HeaderMap, Vec<u8>)>> =
        Default::default();
    for _ in 0..3 {
        let (path, headers, body) = tokio::time::timeout(Duration::from_secs(30), got.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("the receiver stopped"))?;
        by_path.entry(path).or_default().push((headers, body));
    }
    let tries = &by_path["ci"];
    assert_eq!(tries.len(), 2);
    let delivery = |h: &HeaderMap, k: &str| {
        h.get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(
        delivery(&tries[0].0, "UniDesk-Delivery"),
        delivery(&tries[1].0, "UniDesk-Delivery")
    );
    assert_eq!(delivery(&tries[1].0, "UniDesk-Event"), "task.failed");
    let now = ud_schemas::now_millis() / 1000;
    let signature = delivery(&tries[1].0, "UniDesk-Signature");
    assert!(
        ud_notify::sign::verify(&secret, &signature, &tries[1].1, now, 300),
        "{signature}"
    );
    assert!(!ud_notify::sign::verify(
        "another key",
        &signature,
        &tries[1].1,
        now,
        300
    ));
    let event: Value = serde_json::from_slice(&tries[1].1)?;
    assert_eq!(event["type"], "task.failed");
    assert_eq!(event["task_id"], id.to_string());
    assert_eq!(event["project"], "lab");
    assert_eq!(event["data"]["reason"], "exited with 3");
    let chat: Value = serde_json::from_slice(&by_path["chat"][0].1)?;
    assert_eq!(
        chat["text"],
        format!("UniDesk: task train ({id}) in project lab failed: exited with 3")
    );

    // The log says how it went.
    let log = logged(&s, &lab, "ci", &mut ci_log).await?;
    assert_eq!(log[0]["outcome"], "delivered", "{log}");
    assert_eq!(log[0]["attempts"], 2);
    assert_eq!(log[0]["status"], 204);
    assert_eq!(log[0]["task_id"], id.to_string());

    // Deleted: listed no more; another project cannot touch it.
    let resp = s
        .http
        .delete(s.url("/api/v1/projects/lab/webhooks/ci"))
        .bearer_auth(&other)
        .send()
        .await?;
    assert_eq!(resp.status(), Status::NOT_FOUND);
    let resp = s
        .http
        .delete(s.url("/api/v1/projects/lab/webhooks/ci"))
        .bearer_auth(&lab)
        .send()
        .await?;
    assert_eq!(resp.status(), Status::NO_CONTENT);
    let list: Value = s
        .http
        .get(s.url("/api/v1/projects/lab/webhooks"))
        .bearer_auth(&lab)
        .send()
        .await?
        .json()
        .await?;
    let names: Vec<&str> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["name"].as_str())
        .collect();
    assert_eq!(names, ["chat"]);
    assert!(list[0].get("secret").is_none());

    // A receiver that keeps failing: deleting its webhook ends the tries.
    let resp = create(
        lab.clone(),
        json!({"name": "dead", "url": format!("{base}/dead"), "events": ["task.failed"]}),
    )
    .await?;
    assert_eq!(resp.status(), Status::CREATED);
    let mut dead_log = log_of(&s, "dead").await?;
    a_task_fails(&s, &lab, "exited with 1").await?;
    loop {
        let (path, _, _) = tokio::time::timeout(Duration::from_secs(30), got.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("the receiver stopped"))?;
        if path == "dead" {
            break;
        }
    }
    s.http
        .delete(s.url("/api/v1/projects/lab/webhooks/dead"))
        .bearer_auth(&lab)
        .send()
        .await?
        .error_for_status()?;
    let log = logged(&s, &lab, "dead", &mut dead_log).await?;
    assert_eq!(log[0]["outcome"], "failed", "{log}");
    assert_eq!(log[0]["error"], "the webhook was deleted", "{log}");
    assert_eq!(log[0]["status"], 500, "{log}");
    Ok(())
}

/// The next body the receiver got on `path`.
async fn next_on(rx: &mut mpsc::UnboundedReceiver<Got>, path: &str) -> Result<Value> {
    loop {
        let (p, _, body) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("the receiver stopped"))?;
        if p == path {
            return Ok(serde_json::from_slice(&body)?);
        }
    }
}

#[tokio::test]
async fn a_node_going_offline_and_a_project_at_its_quota_are_told() -> Result<()> {
    // With the scheduler (no nodes): it holds tasks back by quota.
    let (nats, pg) = (
        ud_testkit::NatsServer::start().await?,
        ud_testkit::PgDatabase::create().await?,
    );
    let cfg = ud_server::ServerConfig {
        edge: Some(ud_server::EdgeConfig {
            hub: None,
            controller: ud_core::edge::scheduler::ControllerSettings {
                heartbeat_timeout: Duration::from_secs(60),
                check_interval: Duration::from_millis(100),
                cancel_grace_seconds: 1,
                placement: Default::default(),
                queues: Default::default(),
                lost_after: Duration::ZERO,
                max_lost_after: Duration::from_secs(3600),
            },
            git_credentials: Default::default(),
        }),
        webhooks: ud_notify::deliver::Settings {
            allow_private: true,
            ..Default::default()
        },
        ..ud_server::ServerConfig::local(nats.url(), pg.url.clone())
    };
    let s = Stack::start_config(nats, pg, cfg).await?;
    let lab = s.token(&["lab"]).await?;
    let (base, mut got) = receiver().await?;
    for (name, event) in [("ops", "node.offline"), ("quota", "quota.reached")] {
        let resp = s
            .http
            .post(s.url("/api/v1/projects/lab/webhooks"))
            .bearer_auth(&lab)
            .json(&json!({"name": name, "url": format!("{base}/{name}"), "events": [event]}))
            .send()
            .await?;
        assert_eq!(resp.status(), Status::CREATED, "{}", resp.text().await?);
    }

    // A node goes offline (as the hub's liveness check says it).
    let node: Value = s
        .http
        .post(s.url("/api/v1/nodes"))
        .bearer_auth(&s.admin)
        .json(&json!({"name": "gpu-7"}))
        .send()
        .await?
        .json()
        .await?;
    let node_id: NodeId = node["node_id"].as_str().unwrap_or_default().parse()?;
    let offline = ud_schemas::Event::Node(
        node_id,
        ud_schemas::NodeEvent::WentOffline(ud_schemas::events::NodeWentOffline {
            at: ud_schemas::now_millis(),
            last_seen: ud_schemas::now_millis() - 90_000,
        }),
    );
    s.server
        .state
        .commands
        .store()
        .append(
            &offline,
            &ud_schemas::EventMeta::new("liveness"),
            ud_core::Expect::Any,
        )
        .await?;
    let told = next_on(&mut got, "ops").await?;
    assert_eq!(
        (
            told["type"].as_str(),
            told["node_name"].as_str(),
            told["node_id"].as_str()
        ),
        (
            Some("node.offline"),
            Some("gpu-7"),
            Some(node_id.to_string().as_str())
        ),
        "{told}"
    );

    // With a quota of no tasks at once, the scheduler holds the project's
    // tasks back: the project is told once, not for each task.
    let resp = s
        .http
        .put(s.url("/api/v1/projects/lab/quota"))
        .bearer_auth(&s.admin)
        .json(&json!({"max_tasks": 0}))
        .send()
        .await?;
    assert_eq!(resp.status(), Status::OK, "{}", resp.text().await?);
    let mut log = log_of(&s, "quota").await?;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let v: Value = s
            .http
            .post(s.url("/api/v1/tasks?wait=projected"))
            .bearer_auth(&lab)
            .json(&task("lab"))
            .send()
            .await?
            .json()
            .await?;
        ids.push(v["task_id"].as_str().unwrap_or_default().to_owned());
    }
    let told = next_on(&mut got, "quota").await?;
    assert_eq!(told["type"], "quota.reached", "{told}");
    assert_eq!(told["data"]["kind"], "quota tasks", "{told}");
    assert!(ids.iter().any(|i| told["task_id"] == *i.as_str()), "{told}");
    // Every task waits saying so; only the one delivery was made.
    for id in &ids {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let t: Value = s
                .http
                .get(s.url(&format!("/api/v1/tasks/{id}")))
                .bearer_auth(&lab)
                .send()
                .await?
                .json()
                .await?;
            if t["waiting_reason"]
                .as_str()
                .is_some_and(|r| r.contains("quota of 0 tasks"))
            {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{t}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Once the service has handled every waiting event, still one.
    let js = s.server.state.commands.store().jetstream().clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut c: async_nats::jetstream::consumer::PullConsumer = js
            .get_consumer_from_stream(ud_notify::deliver::CONSUMER, "UD_TASKS")
            .await?;
        let info = c.info().await?;
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{info:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let entries = logged(&s, &lab, "quota", &mut log).await?;
    assert_eq!(entries.as_array().map(Vec::len), Some(1), "{entries}");
    assert!(got.try_recv().is_err(), "a second quota notice");
    Ok(())
}

/// A mail an SMTP server took: the envelope's recipients and the data.
type Mail = (Vec<String>, String);

/// A small SMTP server on 127.0.0.1 that refuses the first mail once (451,
/// try again later) and takes every other; its port and the mails.
async fn smtp_server() -> Result<(u16, mpsc::UnboundedReceiver<Mail>)> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let (tx, rx) = mpsc::unbounded_channel();
    let refused = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (tx, refused) = (tx.clone(), refused.clone());
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut lines = BufReader::new(read).lines();
                let _ = write.write_all(b"220 test ESMTP\r\n").await;
                let (mut to, mut data, mut in_data) = (Vec::new(), String::new(), false);
                while let Ok(Some(line)) = lines.next_line().await {
                    if in_data {
                        if line == "." {
                            in_data = false;
                            let _ = tx.send((std::mem::take(&mut to), std::mem::take(&mut data)));
                            let _ = write.write_all(b"250 2.0.0 queued\r\n").await;
                        } else {
                            data.push_str(&line);
                            data.push('\n');
                        }
                        continue;
                    }
                    let verb = line.get(..4).unwrap_or_default().to_ascii_uppercase();
                    let answer: &[u8] = match verb.as_str() {
                        "EHLO" | "HELO" => b"250 test\r\n",
                        "MAIL" if !refused.swap(true, std::sync::atomic::Ordering::SeqCst) => {
                            b"451 4.3.0 try again later\r\n"
                        }
                        "RCPT" => {
                            to.push(
                                line[8..]
                                    .trim_matches(|c| c == '<' || c == '>' || c == ':')
                                    .to_owned(),
                            );
                            b"250 2.1.5 ok\r\n"
                        }
                        "DATA" => {
                            in_data = true;
                            b"354 go on\r\n"
                        }
                        "QUIT" => {
                            let _ = write.write_all(b"221 bye\r\n").await;
                            break;
                        }
                        _ => b"250 ok\r\n",
                    };
                    let _ = write.write_all(answer).await;
                }
            });
        }
    });
    Ok((port, rx))
}

#[tokio::test]
async fn an_email_webhook_is_mailed_through_the_smtp_server_of_the_settings() -> Result<()> {
    // Without an SMTP server, e-mail webhooks are refused.
    let plain = Stack::start().await?;
    let lab = plain.token(&["lab"]).await?;
    let mail_hook = json!({"name": "ops", "url": "mailto:ops@lab.example.org,ada@lab.example.org",
        "events": ["task.failed"], "format": "email"});
    let resp = plain
        .http
        .post(plain.url("/api/v1/projects/lab/webhooks"))
        .bearer_auth(&lab)
        .json(&mail_hook)
        .send()
        .await?;
    assert_eq!(resp.status(), Status::BAD_REQUEST);
    assert!(resp.text().await?.contains("UD_SMTP_URL"));
    drop(plain);

    let (port, mut mails) = smtp_server().await?;
    let (nats, pg) = (
        ud_testkit::NatsServer::start().await?,
        ud_testkit::PgDatabase::create().await?,
    );
    let cfg = ud_server::ServerConfig {
        webhooks: ud_notify::deliver::Settings {
            allow_private: true,
            first_delay: Duration::from_millis(200),
            smtp: Some(ud_notify::deliver::Smtp {
                url: format!("smtp://127.0.0.1:{port}"),
                from: "UniDesk <unidesk@lab.example.org>".into(),
            }),
            ..Default::default()
        },
        ..ud_server::ServerConfig::local(nats.url(), pg.url.clone())
    };
    let s = Stack::start_config(nats, pg, cfg).await?;
    let lab = s.token(&["lab"]).await?;
    // A bad address is refused, naming the field.
    let resp = s
        .http
        .post(s.url("/api/v1/projects/lab/webhooks"))
        .bearer_auth(&lab)
        .json(&json!({"name": "ops", "url": "mailto:ops@", "events": ["task.failed"], "format": "email"}))
        .send()
        .await?;
    assert_eq!(resp.status(), Status::BAD_REQUEST);
    assert!(resp.text().await?.contains("mailto:"));
    let resp = s
        .http
        .post(s.url("/api/v1/projects/lab/webhooks"))
        .bearer_auth(&lab)
        .json(&mail_hook)
        .send()
        .await?;
    assert_eq!(resp.status(), Status::CREATED, "{}", resp.text().await?);
    let mut log = log_of(&s, "ops").await?;

    let id = a_task_fails(&s, &lab, "exit 3").await?;
    let (to, data) = tokio::time::timeout(Duration::from_secs(30), mails.recv())
        .await?
        .ok_or_else(|| anyhow::anyhow!("the SMTP server stopped"))?;
    assert_eq!(to, ["ops@lab.example.org", "ada@lab.example.org"]);
    // Header lines may be folded: read them unfolded.
    let data = data.replace("\n ", " ");
    assert!(
        data.contains("From: UniDesk <unidesk@lab.example.org>"),
        "{data}"
    );
    assert!(
        data.contains(&format!(
            "Subject: UniDesk: task train ({id}) in project lab failed: exit 3"
        )),
        "{data}"
    );
    assert!(data.contains("\"type\": \"task.failed\""), "{data}");
    // Refused once (451), then taken: two tries, logged as delivered.
    let entries = logged(&s, &lab, "ops", &mut log).await?;
    assert_eq!(entries[0]["outcome"], "delivered", "{entries}");
    assert_eq!(entries[0]["attempts"], 2, "{entries}");
    assert_eq!(entries[0]["status"], 250, "{entries}");
    Ok(())
}
