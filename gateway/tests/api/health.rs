//! Health, metrics, the OpenAPI document, full disks, supervised services.

use anyhow::Result;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{task, Stack};

#[tokio::test]
async fn openapi_document_is_served_and_matches_the_committed_one() -> Result<()> {
    let s = Stack::start().await?;
    let served: Value = s
        .http
        .get(s.url("/api/v1/openapi.json"))
        .send()
        .await?
        .json()
        .await?;
    let committed_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
    let generated = ud_gateway::openapi::json();
    if std::env::var_os("UD_BLESS").is_some() {
        std::fs::write(&committed_path, format!("{generated}\n"))?;
    }
    let committed: Value = serde_json::from_str(&std::fs::read_to_string(&committed_path)?)?;
    assert_eq!(
        served, committed,
        "gateway/openapi.json is out of date: run with UD_BLESS=1"
    );
    for path in [
        "/api/v1/tasks",
        "/api/v1/tasks/{id}",
        "/api/v1/tasks/{id}/events",
        "/api/v1/tasks/{id}/cancel",
        "/api/v1/nodes",
        "/api/v1/nodes/{id}",
        "/api/v1/tokens",
    ] {
        assert!(
            served["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    for field in [
        "code_repo_url",
        "code_commit_id",
        "env_repo_url",
        "env_commit_id",
        "dockerfile_path",
    ] {
        assert!(
            served["components"]["schemas"]["SubmitTask"]["properties"][field].is_object(),
            "{field}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn metrics_count_tasks_queues_and_projection_lag() -> Result<()> {
    let s = Stack::start().await?;
    for queue in ["default", "default", "gpu"] {
        let mut body = task("lab");
        body["queue"] = json!(queue);
        let r = s
            .http
            .post(s.url("/api/v1/tasks?wait=projected"))
            .bearer_auth(&s.admin)
            .json(&body)
            .send()
            .await?;
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    let metrics = s.http.get(s.url("/metrics")).send().await?.text().await?;
    for line in [
        "unidesk_tasks{state=\"pending\"} 3",
        "unidesk_queue_depth{queue=\"default\"} 2",
        "unidesk_queue_depth{queue=\"gpu\"} 1",
        "unidesk_projection_lag_events{stream=\"UD_TASKS\"} 0",
        "unidesk_dependency_up{dependency=\"nats\"} 1",
        "unidesk_jetstream_storage_bytes ",
        "unidesk_postgres_database_bytes ",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    // The object store is not configured here: no gauge claims it is down.
    assert!(!metrics.contains("dependency=\"object_store\""));
    Ok(())
}

#[tokio::test]
async fn a_watched_disk_below_its_minimum_is_an_alert_and_not_ready() -> Result<()> {
    use ud_gateway::health::DiskWatch;
    let dir = std::env::temp_dir();
    let path = dir.display().to_string();
    for (min_free_mb, low) in [(1u64, false), (u64::MAX / (1024 * 1024), true)] {
        let s = Stack::start_full(
            None,
            DiskWatch {
                paths: vec![dir.clone()],
                min_free_mb,
            },
        )
        .await?;
        let ready = s.http.get(s.url("/readyz")).send().await?;
        assert_eq!(
            ready.status(),
            if low {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            }
        );
        let body: Value = ready.json().await?;
        assert_eq!(
            body["disk"]["status"],
            if low { "down" } else { "ok" },
            "{body}"
        );
        if low {
            assert!(
                body["disk"]["error"]
                    .as_str()
                    .unwrap_or_default()
                    .contains(&path),
                "{body}"
            );
            // The crossing is an event too, for whoever subscribes to alerts.
            use async_nats::jetstream::consumer::pull::OrderedConfig;
            use futures::StreamExt;
            let js = s.server.state.commands.store().jetstream().clone();
            let mut alerts = js
                .get_stream(ud_schemas::streams::ALERTS)
                .await?
                .create_consumer(OrderedConfig::default())
                .await?
                .messages()
                .await?;
            let m = tokio::time::timeout(std::time::Duration::from_secs(10), alerts.next())
                .await?
                .ok_or_else(|| anyhow::anyhow!("no alert"))??;
            assert_eq!(m.subject.as_str(), "ud.alert.disk.low");
            let alert: ud_schemas::dispatch::DiskAlert =
                ud_schemas::dispatch::from_cbor(&m.payload, "disk-alert")?;
            assert_eq!(alert.path, path);
            assert!(alert.free_bytes < alert.min_free_bytes, "{alert:?}");
        }
        let metrics = s.http.get(s.url("/metrics")).send().await?.text().await?;
        assert!(
            metrics.contains(&format!(
                "unidesk_disk_low{{path=\"{path}\"}} {}",
                u8::from(low)
            )),
            "{metrics}"
        );
        assert!(
            metrics.contains(&format!("unidesk_disk_free_bytes{{path=\"{path}\"}} ")),
            "{metrics}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_full_event_store_refuses_new_work_plainly_and_keeps_what_it_accepted() -> Result<()> {
    // JetStream may use 2 MB of disk; each task below carries about 90 KB.
    let nats = ud_testkit::NatsServer::start_with(ud_testkit::NatsOptions {
        max_file_store: Some("2MB".into()),
        ..Default::default()
    })
    .await?;
    let s = Stack::start_on(nats, None, Default::default()).await?;
    let token = s.token(&["lab"]).await?;
    let mut body = task("lab");
    let big = "x".repeat(30_000);
    body["env"] = json!({"A": big, "B": big, "C": big});
    let (mut accepted, mut refused) = (Vec::new(), None);
    for _ in 0..200 {
        let resp = s
            .http
            .post(s.url("/api/v1/tasks"))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await?;
        match resp.status() {
            StatusCode::ACCEPTED => {
                let v: Value = resp.json().await?;
                accepted.push(v["task_id"].as_str().unwrap_or_default().to_owned());
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                refused = Some(resp.json::<Value>().await?);
                break;
            }
            other => anyhow::bail!("unexpected {other}: {}", resp.text().await?),
        }
    }
    let refused = refused.ok_or_else(|| anyhow::anyhow!("the store never filled"))?;
    assert!(
        refused["message"]
            .as_str()
            .unwrap_or_default()
            .contains("out of space"),
        "{refused}"
    );
    assert!(accepted.len() >= 5, "only {} accepted", accepted.len());
    // Every task it accepted is in the stream and, in time, in the read model;
    // the refused one is nowhere.
    let store = s.server.state.commands.store();
    let submitted = store
        .read_subject(ud_schemas::streams::TASKS, "ud.task.*.submitted")
        .await?;
    assert_eq!(submitted.len(), accepted.len());
    let last = submitted.last().map(|e| e.seq).unwrap_or_default();
    assert!(
        s.server
            .state
            .projected
            .wait(
                ud_schemas::streams::TASKS,
                last,
                std::time::Duration::from_secs(20)
            )
            .await
    );
    for id in &accepted {
        let r = s
            .http
            .get(s.url(&format!("/api/v1/tasks/{id}")))
            .bearer_auth(&token)
            .send()
            .await?;
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "task {id} accepted but not readable"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_full_postgresql_disk_holds_the_read_models_back_and_loses_nothing() -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Some(disk) = ud_testkit::SmallDisk::mount(64)? else {
        eprintln!("skipped: mounting a small filesystem needs root here");
        return Ok(());
    };
    // A tablespace on the small disk, owned by the PostgreSQL server's user.
    let admin = ud_testkit::PgDatabase::admin().await?;
    let data_dir: String = admin.query_one("SHOW data_directory", &[]).await?.get(0);
    let owner = std::fs::metadata(&data_dir)?;
    let space = disk.path().join("pg");
    std::fs::create_dir(&space)?;
    std::os::unix::fs::chown(&space, Some(owner.uid()), Some(owner.gid()))?;
    let ts = format!("ts_{}", uuid::Uuid::now_v7().simple());
    admin
        .batch_execute(&format!(
            "CREATE TABLESPACE {ts} LOCATION '{}'",
            space.display()
        ))
        .await?;
    let pg = ud_testkit::PgDatabase::create_in(&ts).await?;
    let db_name = pg.name.clone();
    // Whatever happens in the drill (a failed assertion too), the database
    // leaves the small disk before the disk goes: PostgreSQL must never be
    // left with a tablespace whose files vanished.
    use futures::FutureExt;
    let result = std::panic::AssertUnwindSafe(full_disk_drill(&disk, pg))
        .catch_unwind()
        .await;
    let _ = disk.unfill();
    let dropped = admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"))
        .await;
    let dropped = match dropped {
        Ok(()) => {
            admin
                .batch_execute(&format!("DROP TABLESPACE IF EXISTS {ts}"))
                .await
        }
        Err(e) => Err(e),
    };
    if dropped.is_err() {
        // Still in use: keep the disk mounted rather than pull it away.
        std::mem::forget(disk);
    }
    match result {
        Ok(r) => r?,
        Err(panic) => std::panic::resume_unwind(panic),
    }
    dropped?;
    Ok(())
}

async fn full_disk_drill(disk: &ud_testkit::SmallDisk, pg: ud_testkit::PgDatabase) -> Result<()> {
    let nats = ud_testkit::NatsServer::start().await?;
    let direct = pg.connect().await?;
    let s = Stack::start_on_db(nats, pg, None, Default::default()).await?;
    let token = s.token(&["lab"]).await?;
    let submit = || async {
        let r = s
            .http
            .post(s.url("/api/v1/tasks"))
            .bearer_auth(&token)
            .json(&task("lab"))
            .send()
            .await?;
        anyhow::ensure!(r.status() == StatusCode::ACCEPTED, "submit: {}", r.status());
        let v: Value = r.json().await?;
        Ok::<_, anyhow::Error>(v["task_id"].as_str().unwrap_or_default().to_owned())
    };
    let mut ids = vec![submit().await?];
    // The disk fills up: PostgreSQL can no longer write there.
    disk.fill()?;
    let refused = direct
        .batch_execute(
            "CREATE TABLE filler AS SELECT repeat('x', 100) FROM generate_series(1, 100000)",
        )
        .await;
    let said = refused.err().map(|e| format!("{e:?}")).unwrap_or_default();
    assert!(
        said.contains("No space left") || said.contains("could not extend"),
        "{said}"
    );
    // Work is still taken: the events are in JetStream, the read model waits.
    for _ in 0..300 {
        ids.push(submit().await?);
    }
    let last = s
        .server
        .state
        .commands
        .store()
        .read_subject(ud_schemas::streams::TASKS, "ud.task.*.submitted")
        .await?;
    assert_eq!(
        last.len(),
        ids.len(),
        "every accepted task is in the stream"
    );
    let last = last.last().map(|e| e.seq).unwrap_or_default();
    let behind = s.http.get(s.url("/metrics")).send().await?.text().await?;
    assert!(
        !behind.contains("unidesk_projection_lag_events{stream=\"UD_TASKS\"} 0\n"),
        "the read model kept up on a full disk:\n{behind}"
    );
    // Space comes back: the read model catches up with every task, none lost.
    disk.unfill()?;
    assert!(
        s.server
            .state
            .projected
            .wait(
                ud_schemas::streams::TASKS,
                last,
                std::time::Duration::from_secs(60)
            )
            .await,
        "the read model did not catch up"
    );
    let n: i64 = direct
        .query_one("SELECT count(*) FROM tasks WHERE state = 'pending'", &[])
        .await?
        .get(0);
    assert_eq!(n, i64::try_from(ids.len())?);
    Ok(())
}

#[tokio::test]
async fn a_crashed_service_is_named_by_readyz_and_comes_back() -> Result<()> {
    // Restarts slow enough to be seen.
    let s = Stack::start_restarting(ud_server::Policy {
        first_delay: std::time::Duration::from_secs(2),
        max_delay: std::time::Duration::from_secs(2),
        ..Default::default()
    })
    .await?;
    let ready = |s: &Stack| {
        let (http, url) = (s.http.clone(), s.url("/readyz"));
        async move {
            let r = http.get(url).send().await?;
            Ok::<_, anyhow::Error>((r.status(), r.json::<Value>().await?))
        }
    };
    assert_eq!(ready(&s).await?.0, StatusCode::OK);
    assert!(s.server.crash("projector:UD_TASKS"));
    // Named while it waits to restart...
    let (status, body) = ready(&s).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let error = body["services"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("projector:UD_TASKS restarting (it was aborted)"),
        "{body}"
    );
    // ...then back, and projecting again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while ready(&s).await?.0 != StatusCode::OK {
        assert!(std::time::Instant::now() < deadline, "not ready again");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let accepted: Value = s
        .http
        .post(s.url("/api/v1/tasks?wait=projected"))
        .bearer_auth(&s.admin)
        .json(&task("lab"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(accepted["projected"], true, "{accepted}");
    Ok(())
}
