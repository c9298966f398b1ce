//! The REST API end to end: real nats-server, real PostgreSQL, real HTTP.

mod common;

use anyhow::Result;
use common::{task, Stack};
use reqwest::StatusCode;
use serde_json::{json, Value};

#[tokio::test]
async fn submit_read_list_history_cancel() -> Result<()> {
    let s = Stack::start().await?;
    let token = s.token(&["lab"]).await?;
    let resp = s
        .http
        .post(s.url("/api/v1/tasks?wait=projected"))
        .bearer_auth(&token)
        .json(&task("lab"))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let accepted: Value = resp.json().await?;
    assert_eq!(accepted["projected"], true);
    let id = accepted["task_id"].as_str().unwrap_or_default().to_owned();

    // Read-your-writes: the read model has it right away.
    let t: Value = s
        .http
        .get(s.url(&format!("/api/v1/tasks/{id}")))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(t["state"], "pending");
    assert_eq!(t["project"], "lab");
    assert_eq!(t["spec"]["resources"]["cpu_millis"], 2000);
    assert_eq!(t["spec"]["dockerfile_path"], "envs/cpu/Dockerfile");
    assert_eq!(t["submitted_by"], "token:user-lab");

    let resp = s
        .http
        .post(s.url(&format!("/api/v1/tasks/{id}/cancel?wait=projected")))
        .bearer_auth(&token)
        .json(&json!({"reason": "changed my mind"}))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let t: Value = s
        .http
        .get(s.url(&format!("/api/v1/tasks/{id}")))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(t["state"], "cancelled");
    assert_eq!(t["reason"], "changed my mind");
    assert_eq!(t["version"], 2);

    // Cancelling again is refused, and appends nothing.
    let before = s.tasks_in_stream().await?;
    let resp = s
        .http
        .post(s.url(&format!("/api/v1/tasks/{id}/cancel")))
        .bearer_auth(&token)
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    let body: Value = resp.json().await?;
    assert_eq!(body["error"], "invalid_state");
    assert_eq!(s.tasks_in_stream().await?, before);

    let history: Value = s
        .http
        .get(s.url(&format!("/api/v1/tasks/{id}/events")))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    let types: Vec<&str> = history
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert_eq!(types, vec!["task.submitted", "task.cancelled"]);
    assert_eq!(
        history[0]["data"]["spec"]["command"],
        json!(["python", "train.py"])
    );
    assert_eq!(history[1]["actor"], "token:user-lab");
    assert_eq!(history[0]["schema_version"], 1);
    Ok(())
}

#[tokio::test]
async fn idempotency_key_returns_the_same_task() -> Result<()> {
    let s = Stack::start().await?;
    let token = s.token(&["lab"]).await?;
    let send = || {
        s.http
            .post(s.url("/api/v1/tasks"))
            .bearer_auth(&token)
            .header("Idempotency-Key", "run-42")
            .json(&task("lab"))
            .send()
    };
    let first = send().await?;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first: Value = first.json().await?;
    let again = send().await?;
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    assert_eq!(
        again
            .headers()
            .get("idempotent-replayed")
            .map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    let again: Value = again.json().await?;
    assert_eq!(first["task_id"], again["task_id"]);
    assert_eq!(again["created"], false);
    assert_eq!(s.tasks_in_stream().await?, 1);
    let mut other = task("lab");
    other["command"] = json!(["echo"]);
    let resp = s
        .http
        .post(s.url("/api/v1/tasks"))
        .bearer_auth(&token)
        .header("Idempotency-Key", "run-42")
        .json(&other)
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(s.tasks_in_stream().await?, 1);
    Ok(())
}

#[tokio::test]
async fn bad_input_names_the_field_and_appends_nothing() -> Result<()> {
    let s = Stack::start().await?;
    let token = s.token(&["lab"]).await?;
    let with = |f: &dyn Fn(&mut Value)| {
        let mut t = task("lab");
        f(&mut t);
        t
    };
    let cases: Vec<(String, Value, StatusCode, &str)> = vec![
        (
            "missing field".into(),
            with(&|t| {
                t.as_object_mut().map(|o| o.remove("code_commit_id"));
            }),
            StatusCode::BAD_REQUEST,
            "code_commit_id",
        ),
        (
            "unknown field".into(),
            with(&|t| t["colour"] = json!("red")),
            StatusCode::BAD_REQUEST,
            "colour",
        ),
        (
            "short commit".into(),
            with(&|t| t["code_commit_id"] = json!("abc123")),
            StatusCode::BAD_REQUEST,
            "code_commit_id",
        ),
        (
            "branch name".into(),
            with(&|t| t["env_commit_id"] = json!("main")),
            StatusCode::BAD_REQUEST,
            "env_commit_id",
        ),
        (
            "credentials in the URL".into(),
            with(&|t| t["code_repo_url"] = json!("https://me:secret@x.org/r.git")),
            StatusCode::BAD_REQUEST,
            "code_repo_url",
        ),
        (
            "ftp scheme".into(),
            with(&|t| t["env_repo_url"] = json!("ftp://x.org/r.git")),
            StatusCode::BAD_REQUEST,
            "env_repo_url",
        ),
        (
            "escaping dockerfile".into(),
            with(&|t| t["dockerfile_path"] = json!("../../etc/Dockerfile")),
            StatusCode::BAD_REQUEST,
            "dockerfile_path",
        ),
        (
            "absolute dockerfile".into(),
            with(&|t| t["dockerfile_path"] = json!("/Dockerfile")),
            StatusCode::BAD_REQUEST,
            "dockerfile_path",
        ),
        (
            "negative memory".into(),
            with(&|t| t["resources"]["memory_mb"] = json!(-1)),
            StatusCode::BAD_REQUEST,
            "resources.memory_mb",
        ),
        (
            "absurd cpus".into(),
            with(&|t| t["resources"]["cpus"] = json!(1e9)),
            StatusCode::BAD_REQUEST,
            "resources.cpus",
        ),
        (
            "absurd gpus".into(),
            with(&|t| t["resources"]["gpus"] = json!(1000)),
            StatusCode::BAD_REQUEST,
            "resources.gpus",
        ),
        (
            "wrong type".into(),
            with(&|t| t["resources"]["gpus"] = json!("two")),
            StatusCode::BAD_REQUEST,
            "resources.gpus",
        ),
        (
            "empty command".into(),
            with(&|t| t["command"] = json!([])),
            StatusCode::BAD_REQUEST,
            "command",
        ),
        (
            "bad env name".into(),
            with(&|t| t["env"] = json!({"1BAD": "x"})),
            StatusCode::BAD_REQUEST,
            "env.1BAD",
        ),
        (
            "zero timeout".into(),
            with(&|t| t["timeout_seconds"] = json!(0)),
            StatusCode::BAD_REQUEST,
            "timeout_seconds",
        ),
        (
            "bad retry".into(),
            with(&|t| t["retry"]["max_attempts"] = json!(0)),
            StatusCode::BAD_REQUEST,
            "retry.max_attempts",
        ),
        (
            "bad project".into(),
            with(&|t| t["project"] = json!("Not A Project")),
            StatusCode::BAD_REQUEST,
            "project",
        ),
        (
            "other project".into(),
            with(&|t| t["project"] = json!("secret")),
            StatusCode::FORBIDDEN,
            "",
        ),
    ];
    for (name, body, status, field) in cases {
        let resp = s
            .http
            .post(s.url("/api/v1/tasks"))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await?;
        assert_eq!(resp.status(), status, "{name}");
        let err: Value = resp.json().await?;
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}: {err}"
        );
        if !field.is_empty() {
            let fields: Vec<&str> = err["fields"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f["field"].as_str())
                .collect();
            assert!(fields.contains(&field), "{name}: expected {field} in {err}");
        }
    }
    // Malformed JSON and oversized bodies.
    let resp = s
        .http
        .post(s.url("/api/v1/tasks"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body("{\"project\": ")
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(resp.json::<Value>().await?["error"], "invalid_request");
    let mut huge = task("lab");
    huge["args"] = json!(vec!["x".repeat(1000); 400]);
    let resp = s
        .http
        .post(s.url("/api/v1/tasks"))
        .bearer_auth(&token)
        .json(&huge)
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(resp.json::<Value>().await?["error"], "body_too_large");
    let resp = s
        .http
        .post(s.url("/api/v1/tasks"))
        .bearer_auth(&token)
        .header("Idempotency-Key", "has space")
        .json(&task("lab"))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        s.tasks_in_stream().await?,
        0,
        "a rejected request appended an event"
    );

    // Unknown ids.
    for path in [
        "/api/v1/tasks/0190f000-0000-7000-8000-000000000000",
        "/api/v1/tasks/not-an-id",
        "/api/v1/nodes/nope",
        "/api/v1/tasks/0190f000-0000-7000-8000-000000000000/events",
    ] {
        let resp = s.http.get(s.url(path)).bearer_auth(&token).send().await?;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
        assert_eq!(resp.json::<Value>().await?["error"], "not_found");
    }
    let resp = s
        .http
        .post(s.url("/api/v1/tasks/0190f000-0000-7000-8000-000000000000/cancel"))
        .bearer_auth(&token)
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let resp = s
        .http
        .get(s.url("/api/v1/tasks?state=bogus"))
        .bearer_auth(&token)
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = s
        .http
        .get(s.url("/api/v1/tasks?limit=0"))
        .bearer_auth(&token)
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    Ok(())
}

#[tokio::test]
async fn tokens_are_required_scoped_and_revocable() -> Result<()> {
    let s = Stack::start().await?;
    let lab = s.token(&["lab"]).await?;
    let other = s.token(&["other"]).await?;
    let resp = s.http.get(s.url("/api/v1/tasks")).send().await?;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = s
        .http
        .get(s.url("/api/v1/tasks"))
        .bearer_auth("udt_wrong")
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // Non-admins cannot issue tokens.
    let resp = s
        .http
        .post(s.url("/api/v1/tokens"))
        .bearer_auth(&lab)
        .json(&json!({"name": "x", "projects": ["lab"]}))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // A token's name becomes the actor of what it does, recorded in every
    // event's headers: a line break in it is refused, naming the field.
    let resp = s
        .http
        .post(s.url("/api/v1/tokens"))
        .bearer_auth(&s.admin)
        .json(&json!({"name": "x\r\nUd-Actor: y", "projects": ["lab"]}))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: Value = resp.json().await?;
    assert!(body.to_string().contains("name"), "{body}");

    let a: Value = s
        .http
        .post(s.url("/api/v1/tasks?wait=projected"))
        .bearer_auth(&lab)
        .json(&task("lab"))
        .send()
        .await?
        .json()
        .await?;
    let b: Value = s
        .http
        .post(s.url("/api/v1/tasks?wait=projected"))
        .bearer_auth(&other)
        .json(&task("other"))
        .send()
        .await?
        .json()
        .await?;
    let lab_id = a["task_id"].as_str().unwrap_or_default();
    let other_id = b["task_id"].as_str().unwrap_or_default();
    // Each token sees only its own project's task.
    let page: Value = s
        .http
        .get(s.url("/api/v1/tasks"))
        .bearer_auth(&lab)
        .send()
        .await?
        .json()
        .await?;
    let ids: Vec<&str> = page["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["id"].as_str())
        .collect();
    assert_eq!(ids, vec![lab_id]);
    let page: Value = s
        .http
        .get(s.url("/api/v1/tasks?project=other"))
        .bearer_auth(&lab)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(page["items"].as_array().map(Vec::len), Some(0));
    for path in [
        format!("/api/v1/tasks/{other_id}"),
        format!("/api/v1/tasks/{other_id}/events"),
    ] {
        let resp = s.http.get(s.url(&path)).bearer_auth(&lab).send().await?;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
    }
    let resp = s
        .http
        .post(s.url(&format!("/api/v1/tasks/{other_id}/cancel")))
        .bearer_auth(&lab)
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    // The admin sees both.
    let page: Value = s
        .http
        .get(s.url("/api/v1/tasks"))
        .bearer_auth(&s.admin)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(page["items"].as_array().map(Vec::len), Some(2));

    // Tokens are stored as digests only.
    let c = s.server.state.db.client().await?;
    let rows = c.query("SELECT digest FROM api_tokens", &[]).await?;
    for r in rows {
        let digest: String = r.get(0);
        assert!(digest != lab && digest != other && !digest.contains(&lab[4..]));
        assert_eq!(digest.len(), 64);
    }
    let history = ud_core::EventStore::clone(s.server.state.commands.store())
        .read_subject(ud_schemas::streams::AUTH, "ud.auth.>")
        .await?;
    for e in &history {
        let json = ud_schemas::codec::event_data_json(&e.envelope.event).to_string();
        assert!(
            !json.contains(&lab[4..]) && !json.contains(&other[4..]),
            "a secret reached the stream"
        );
    }

    // Revocation.
    let ids: Vec<uuid::Uuid> = c
        .query(
            "SELECT id FROM api_tokens WHERE projects = ARRAY['lab']",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let resp = s
        .http
        .delete(s.url(&format!("/api/v1/tokens/{}", ids[0])))
        .bearer_auth(&s.admin)
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let resp = s
        .http
        .get(s.url("/api/v1/tasks"))
        .bearer_auth(&lab)
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    Ok(())
}

#[tokio::test]
async fn list_filters_and_pages() -> Result<()> {
    let s = Stack::start().await?;
    let token = s.token(&["lab"]).await?;
    let mut ids = Vec::new();
    for _ in 0..7 {
        let v: Value = s
            .http
            .post(s.url("/api/v1/tasks?wait=projected"))
            .bearer_auth(&token)
            .json(&task("lab"))
            .send()
            .await?
            .json()
            .await?;
        ids.push(v["task_id"].as_str().unwrap_or_default().to_owned());
    }
    s.http
        .post(s.url(&format!("/api/v1/tasks/{}/cancel?wait=projected", ids[2])))
        .bearer_auth(&token)
        .send()
        .await?
        .error_for_status()?;
    let mut seen = Vec::new();
    let mut url = s.url("/api/v1/tasks?limit=3");
    loop {
        let page: Value = s
            .http
            .get(&url)
            .bearer_auth(&token)
            .send()
            .await?
            .json()
            .await?;
        seen.extend(
            page["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t["id"].as_str().map(str::to_owned)),
        );
        match page["next"].as_str() {
            Some(next) => url = s.url(&format!("/api/v1/tasks?limit=3&before={next}")),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(seen, ids, "newest first, every task exactly once");
    let page: Value = s
        .http
        .get(s.url("/api/v1/tasks?state=cancelled"))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(page["items"].as_array().map(Vec::len), Some(1));
    let page: Value = s
        .http
        .get(s.url("/api/v1/tasks?state=pending&project=lab"))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(page["items"].as_array().map(Vec::len), Some(6));
    Ok(())
}

#[tokio::test]
async fn cancelling_a_project_cancels_its_unfinished_tasks_only() -> Result<()> {
    let s = Stack::start().await?;
    let token = s.token(&["lab", "other"]).await?;
    let outsider = s.token(&["other"]).await?;
    let submit = |project: &'static str| {
        let (http, url, token) = (
            s.http.clone(),
            s.url("/api/v1/tasks?wait=projected"),
            token.clone(),
        );
        async move {
            let v: Value = http
                .post(url)
                .bearer_auth(&token)
                .json(&task(project))
                .send()
                .await?
                .json()
                .await?;
            anyhow::Ok(v["task_id"].as_str().unwrap_or_default().to_owned())
        }
    };
    let lab: Vec<String> = vec![
        submit("lab").await?,
        submit("lab").await?,
        submit("lab").await?,
    ];
    let kept = submit("other").await?;
    // One of them has finished already.
    s.http
        .post(s.url(&format!("/api/v1/tasks/{}/cancel?wait=projected", lab[0])))
        .bearer_auth(&token)
        .send()
        .await?
        .error_for_status()?;
    // A token of another project cannot.
    let resp = s
        .http
        .post(s.url("/api/v1/projects/lab/cancel"))
        .bearer_auth(&outsider)
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let resp = s
        .http
        .post(s.url("/api/v1/projects/lab/cancel"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"reason": "budget"}))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let out: Value = resp.json().await?;
    let mut cancelled: Vec<String> = out["cancelled"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    cancelled.sort();
    let mut expected = lab[1..].to_vec();
    expected.sort();
    assert_eq!(cancelled, expected);
    for id in &lab[1..] {
        let t: Value = s
            .http
            .get(s.url(&format!("/api/v1/tasks/{id}")))
            .bearer_auth(&token)
            .send()
            .await?
            .json()
            .await?;
        assert_eq!(
            (t["state"].as_str(), t["reason"].as_str()),
            (Some("cancelled"), Some("budget")),
            "{t}"
        );
    }
    let t: Value = s
        .http
        .get(s.url(&format!("/api/v1/tasks/{kept}")))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(t["state"], "pending");
    // A queue: only its tasks, and only those the token may see.
    let mut queued = task("other");
    queued["queue"] = serde_json::json!("night");
    let v: Value = s
        .http
        .post(s.url("/api/v1/tasks?wait=projected"))
        .bearer_auth(&token)
        .json(&queued)
        .send()
        .await?
        .json()
        .await?;
    let night = v["task_id"].as_str().unwrap_or_default().to_owned();
    let mut hidden = task("lab");
    hidden["queue"] = serde_json::json!("night");
    let v: Value = s
        .http
        .post(s.url("/api/v1/tasks?wait=projected"))
        .bearer_auth(&token)
        .json(&hidden)
        .send()
        .await?
        .json()
        .await?;
    let lab_night = v["task_id"].as_str().unwrap_or_default().to_owned();
    let out: Value = s
        .http
        .post(s.url("/api/v1/queues/night/cancel"))
        .bearer_auth(&outsider)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(out["cancelled"], serde_json::json!([night]));
    let t: Value = s
        .http
        .get(s.url(&format!("/api/v1/tasks/{kept}")))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        t["state"], "pending",
        "a task of another queue was cancelled"
    );
    let t: Value = s
        .http
        .get(s.url(&format!("/api/v1/tasks/{lab_night}")))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        t["state"], "pending",
        "a task the token may not see was cancelled"
    );
    Ok(())
}

#[tokio::test]
async fn concurrent_cancels_one_wins_the_rest_get_409() -> Result<()> {
    let s = Stack::start().await?;
    let token = s.token(&["lab"]).await?;
    let v: Value = s
        .http
        .post(s.url("/api/v1/tasks"))
        .bearer_auth(&token)
        .json(&task("lab"))
        .send()
        .await?
        .json()
        .await?;
    let id = v["task_id"].as_str().unwrap_or_default().to_owned();
    let url = s.url(&format!("/api/v1/tasks/{id}/cancel"));
    let results =
        futures::future::join_all((0..8).map(|_| s.http.post(&url).bearer_auth(&token).send()))
            .await;
    let statuses: Vec<StatusCode> = results
        .into_iter()
        .map(|r| r.map(|r| r.status()))
        .collect::<Result<_, _>>()?;
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::ACCEPTED)
            .count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::ACCEPTED || *s == StatusCode::CONFLICT),
        "{statuses:?}"
    );
    let history: Value = s
        .http
        .get(s.url(&format!("/api/v1/tasks/{id}/events")))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(history.as_array().map(Vec::len), Some(2));
    Ok(())
}

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
async fn stats_count_tasks_per_state_now_and_over_time_per_project() -> Result<()> {
    let s = Stack::start().await?;
    let lab = s.token(&["lab"]).await?;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let v: Value = s
            .http
            .post(s.url("/api/v1/tasks"))
            .bearer_auth(&lab)
            .json(&task("lab"))
            .send()
            .await?
            .json()
            .await?;
        ids.push(v["task_id"].as_str().unwrap_or_default().to_owned());
    }
    s.http
        .post(s.url(&format!("/api/v1/tasks/{}/cancel?wait=projected", ids[0])))
        .bearer_auth(&lab)
        .send()
        .await?
        .error_for_status()?;
    let stats = |token: String, query: &'static str| {
        let (http, url) = (s.http.clone(), s.url(&format!("/api/v1/stats{query}")));
        async move { anyhow::Ok(http.get(url).bearer_auth(token).send().await?) }
    };
    let st: Value = stats(lab.clone(), "?minutes=60&points=10")
        .await?
        .json()
        .await?;
    assert_eq!(st["tasks_by_state"]["pending"], 2);
    assert_eq!(st["tasks_by_state"]["cancelled"], 1);
    assert_eq!(st["tasks_by_state"]["succeeded"], 0);
    let points = st["timeline"].as_array().cloned().unwrap_or_default();
    assert_eq!(points.len(), 10);
    assert_eq!(
        (&points[0]["unfinished"], &points[0]["cancelled"]),
        (&json!(0), &json!(0))
    );
    assert_eq!(
        (&points[9]["unfinished"], &points[9]["cancelled"]),
        (&json!(2), &json!(1))
    );

    // Another project's token counts none of them.
    let other = s.token(&["other"]).await?;
    let st: Value = stats(other, "").await?.json().await?;
    assert_eq!(st["tasks_by_state"]["pending"], 0);
    assert_eq!(st["timeline"].as_array().map(Vec::len), Some(60));
    assert_eq!(st["timeline"][59]["unfinished"], 0);

    let resp = stats(lab.clone(), "?points=1").await?;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(resp.json::<Value>().await?["fields"][0]["field"], "points");
    let resp = stats(lab, "?minutes=0").await?;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    Ok(())
}

#[tokio::test]
async fn queue_settings_are_set_listed_and_reset_by_admins() -> Result<()> {
    let s = Stack::start().await?;
    let lab = s.token(&["lab"]).await?;
    let put = |token: String, name: &'static str, body: Value| {
        let (http, url) = (s.http.clone(), s.url(&format!("/api/v1/queues/{name}")));
        async move { anyhow::Ok(http.put(url).bearer_auth(token).json(&body).send().await?) }
    };
    // Only admins change queues; bad values name their field.
    let resp = put(lab.clone(), "gpu", json!({"priority": 5})).await?;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = put(s.admin.clone(), "gpu", json!({"priority": 5000})).await?;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        resp.json::<Value>().await?["fields"][0]["field"],
        "priority"
    );
    let resp = put(s.admin.clone(), "gpu", json!({"max_running": 0})).await?;
    assert_eq!(
        resp.json::<Value>().await?["fields"][0]["field"],
        "max_running"
    );
    let resp = put(s.admin.clone(), "GPU!", json!({})).await?;
    assert_eq!(resp.json::<Value>().await?["fields"][0]["field"], "queue");
    let resp = put(s.admin.clone(), "gpu", json!({"priority": 1, "limit": 2})).await?;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    let resp = put(
        s.admin.clone(),
        "gpu",
        json!({"priority": 10, "max_running": 4}),
    )
    .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await?;
    assert_eq!(v["settings"], json!({"priority": 10, "max_running": 4}));
    assert_eq!(v["updated_by"], "token:admin");

    // A task waiting in another queue lists that queue too, with its count.
    let mut body = task("lab");
    body["queue"] = json!("cpu");
    s.http
        .post(s.url("/api/v1/tasks?wait=projected"))
        .bearer_auth(&lab)
        .json(&body)
        .send()
        .await?
        .error_for_status()?;
    let list: Value = s
        .http
        .get(s.url("/api/v1/queues"))
        .bearer_auth(&lab)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(list[0]["name"], "cpu");
    assert_eq!(list[0]["pending"], 1);
    assert_eq!(list[0]["settings"], Value::Null);
    assert_eq!(list[1]["name"], "gpu");
    assert_eq!(list[1]["settings"]["max_running"], 4);

    let resp = s
        .http
        .delete(s.url("/api/v1/queues/gpu"))
        .bearer_auth(&s.admin)
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let list: Value = s
        .http
        .get(s.url("/api/v1/queues"))
        .bearer_auth(&s.admin)
        .send()
        .await?
        .json()
        .await?;
    let names: Vec<&str> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|q| q["name"].as_str())
        .collect();
    assert_eq!(names, vec!["cpu"]);
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
async fn a_read_can_wait_for_the_event_it_has_seen() -> Result<()> {
    let s = Stack::start().await?;
    let token = s.token(&["lab"]).await?;
    for _ in 0..20 {
        // Submitted without waiting: the answer names the event's sequence,
        // as a live event would; reads that pass it see the task at once.
        let accepted: Value = s
            .http
            .post(s.url("/api/v1/tasks"))
            .bearer_auth(&token)
            .json(&task("lab"))
            .send()
            .await?
            .json()
            .await?;
        let (id, seq) = (
            accepted["task_id"].as_str().unwrap_or_default().to_owned(),
            accepted["seq"].as_u64().unwrap_or_default(),
        );
        assert!(seq > 0, "{accepted}");
        let one = s
            .http
            .get(s.url(&format!("/api/v1/tasks/{id}?projected_seq={seq}")))
            .bearer_auth(&token)
            .send()
            .await?;
        assert_eq!(one.status(), StatusCode::OK);
        let page: Value = s
            .http
            .get(s.url(&format!("/api/v1/tasks?projected_seq={seq}&limit=1")))
            .bearer_auth(&token)
            .send()
            .await?
            .json()
            .await?;
        assert_eq!(page["items"][0]["id"], id.as_str(), "{page}");
    }
    // A sequence the read model never reaches: the read waits out its bound
    // (5 s), then answers with what there is.
    let started = std::time::Instant::now();
    let late = s
        .http
        .get(s.url("/api/v1/tasks?projected_seq=1000000000&limit=1"))
        .bearer_auth(&token)
        .send()
        .await?;
    assert_eq!(late.status(), StatusCode::OK);
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(4900),
        "answered after {:?} without waiting",
        started.elapsed()
    );
    let bad = s
        .http
        .get(s.url("/api/v1/tasks?projected_seq=x"))
        .bearer_auth(&token)
        .send()
        .await?;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
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
