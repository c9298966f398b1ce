//! Compute quotas: set by admins, refused field by field when bad, shown
//! with what each project's tasks hold and the GPU-hours they used.

use anyhow::Result;
use reqwest::StatusCode;
use serde_json::{json, Value};
use ud_core::task::TaskCommand;
use ud_schemas::{NodeId, TaskId};

use crate::common::{task, Stack};

impl Stack {
    async fn quota(&self, token: &str, project: &str) -> Result<(StatusCode, Value)> {
        let resp = self
            .http
            .get(self.url(&format!("/api/v1/projects/{project}/quota")))
            .bearer_auth(token)
            .send()
            .await?;
        Ok((resp.status(), resp.json().await.unwrap_or(Value::Null)))
    }
}

#[tokio::test]
async fn quotas_are_set_by_admins_refused_by_field_and_show_usage() -> Result<()> {
    let s = Stack::start().await?;
    let lab = s.token(&["lab"]).await?;
    let other = s.token(&["other"]).await?;
    let put = |token: String, project: &'static str, body: Value| {
        let (http, url) = (
            s.http.clone(),
            s.url(&format!("/api/v1/projects/{project}/quota")),
        );
        async move { anyhow::Ok(http.put(url).bearer_auth(token).json(&body).send().await?) }
    };

    // Only admins; every bad limit named; nothing stored.
    let resp = put(lab.clone(), "lab", json!({"max_gpus": 2})).await?;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = put(
        s.admin.clone(),
        "lab",
        json!({"max_gpus": -1, "max_memory_mb": -5, "max_tasks": 3}),
    )
    .await?;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let v: Value = resp.json().await?;
    let fields: Vec<&str> = v["fields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["field"].as_str())
        .collect();
    assert_eq!(fields, ["max_gpus", "max_memory_mb"], "{v}");
    let resp = put(s.admin.clone(), "Lab!", json!({})).await?;
    assert_eq!(resp.json::<Value>().await?["fields"][0]["field"], "project");
    let resp = put(s.admin.clone(), "lab", json!({"gpus": 2})).await?;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let (status, v) = s.quota(&lab, "lab").await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["quota"], Value::Null, "{v}");

    let resp = put(
        s.admin.clone(),
        "lab",
        json!({"max_gpus": 4, "gpu_hours_per_month": 100}),
    )
    .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await?;
    assert_eq!(
        v["quota"],
        json!({"max_gpus": 4, "gpu_hours_per_month": 100})
    );
    assert_eq!(v["updated_by"], "token:admin");
    // Another project's token sees no such project.
    assert_eq!(s.quota(&other, "lab").await?.0, StatusCode::NOT_FOUND);

    // A task with a GPU runs (as a node would say): it holds it now, and
    // once ended its GPU time is the time between its start and end.
    let v: Value = s
        .http
        .post(s.url("/api/v1/tasks?wait=projected"))
        .bearer_auth(&lab)
        .json(&task("lab"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id: TaskId = v["task_id"].as_str().unwrap_or_default().parse()?;
    let node = NodeId::new();
    s.node_says(
        id,
        TaskCommand::Assign {
            node_id: node,
            gpus: vec!["GPU-0".into()],
        },
    )
    .await?;
    s.node_says(
        id,
        TaskCommand::Start {
            node_id: node,
            attempt: 1,
        },
    )
    .await?;
    let (_, v) = s.quota(&lab, "lab").await?;
    assert_eq!(v["usage"]["tasks"], 1, "{v}");
    assert_eq!(v["usage"]["gpus"], 1);
    assert_eq!(v["usage"]["cpu_millis"], 2000);
    assert_eq!(v["usage"]["memory_mb"], 4096);
    s.node_says(
        id,
        TaskCommand::Succeed {
            node_id: node,
            exit_code: 0,
            attempt: Some(1),
        },
    )
    .await?;
    let events: Value = s
        .http
        .get(s.url(&format!("/api/v1/tasks/{id}/events")))
        .bearer_auth(&lab)
        .send()
        .await?
        .json()
        .await?;
    let at = |kind: &str| {
        events
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["type"] == kind)
            .and_then(|e| e["data"]["at"].as_i64())
            .unwrap_or(-1)
    };
    let ran_ms = at("task.succeeded") - at("task.started");
    assert!(ran_ms >= 0, "{events}");
    let (_, v) = s.quota(&lab, "lab").await?;
    assert_eq!(v["usage"]["tasks"], 0, "{v}");
    assert_eq!(v["usage"]["gpus"], 0);
    let hours = v["usage"]["gpu_hours"].as_f64().unwrap_or(-1.0);
    assert!(
        (hours - ran_ms as f64 / 3_600_000.0).abs() < 1e-9,
        "{hours} GPU-hours for {ran_ms} ms"
    );
    // The same in the statistics, by project and by who submitted.
    let st: Value = s
        .http
        .get(s.url("/api/v1/stats"))
        .bearer_auth(&lab)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        st["usage"]["projects"]["lab"]["gpu_hours"],
        v["usage"]["gpu_hours"]
    );
    assert_eq!(
        st["usage"]["users"]["token:user-lab"]["gpu_hours"], v["usage"]["gpu_hours"],
        "{st}"
    );
    assert_eq!(st["usage"]["month"], v["month"]);

    // The list shows the caller's projects only; an admin's, every quota.
    let list: Value = s
        .http
        .get(s.url("/api/v1/quotas"))
        .bearer_auth(&other)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(list, json!([]));
    let list: Value = s
        .http
        .get(s.url("/api/v1/quotas"))
        .bearer_auth(&s.admin)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(list[0]["project"], "lab");
    assert_eq!(list[0]["quota"]["max_gpus"], 4);

    let resp = s
        .http
        .delete(s.url("/api/v1/projects/lab/quota"))
        .bearer_auth(&s.admin)
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(s.quota(&lab, "lab").await?.1["quota"], Value::Null);
    Ok(())
}
