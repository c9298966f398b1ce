//! Submitting, reading, listing, cancelling tasks; bad input.

use anyhow::Result;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{task, Stack};

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
            "an image and an env repository".into(),
            with(&|t| t["image"] = json!("nvcr.io/nvidia/pytorch:24.05-py3")),
            StatusCode::BAD_REQUEST,
            "image",
        ),
        (
            "an image that is no reference".into(),
            with(&|t| {
                for f in ["env_repo_url", "env_commit_id", "dockerfile_path"] {
                    t.as_object_mut().map(|o| o.remove(f));
                }
                t["image"] = json!("Not An Image");
            }),
            StatusCode::BAD_REQUEST,
            "image",
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
    assert_eq!(
        s.tasks_in_stream().await?,
        0,
        "a rejected request appended an event"
    );
    Ok(())
}

#[tokio::test]
async fn malformed_and_oversized_bodies_are_refused_and_append_nothing() -> Result<()> {
    let s = Stack::start().await?;
    let token = s.token(&["lab"]).await?;
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

    Ok(())
}

#[tokio::test]
async fn unknown_ids_and_bad_list_parameters_are_refused() -> Result<()> {
    let s = Stack::start().await?;
    let token = s.token(&["lab"]).await?;
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
async fn a_task_may_name_an_image_instead_of_an_env_repository() -> Result<()> {
    let s = Stack::start().await?;
    let token = s.token(&["lab"]).await?;
    let mut body = task("lab");
    for f in ["env_repo_url", "env_commit_id", "dockerfile_path"] {
        body.as_object_mut().map(|o| o.remove(f));
    }
    body["image"] = json!("nvcr.io/nvidia/pytorch:24.05-py3");
    let resp = s
        .http
        .post(s.url("/api/v1/tasks?wait=projected"))
        .bearer_auth(&token)
        .json(&body)
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let accepted: Value = resp.json().await?;
    let id = accepted["task_id"].as_str().unwrap_or_default();
    let t: Value = s
        .http
        .get(s.url(&format!("/api/v1/tasks/{id}")))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(t["spec"]["image"], "nvcr.io/nvidia/pytorch:24.05-py3");
    assert_eq!(t["spec"]["env_repo_url"], "");
    assert_eq!(t["spec"]["dockerfile_path"], "");
    Ok(())
}
