//! Statistics and queue settings.

use anyhow::Result;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{task, Stack};

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
    let resp = put(
        s.admin.clone(),
        "gpu",
        json!({"lost_after_seconds": 700_000}),
    )
    .await?;
    assert_eq!(
        resp.json::<Value>().await?["fields"][0]["field"],
        "lost_after_seconds"
    );
    let resp = put(
        s.admin.clone(),
        "slow-links",
        json!({"lost_after_seconds": 1800}),
    )
    .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.json::<Value>().await?["settings"],
        json!({"priority": 0, "max_running": null, "lost_after_seconds": 1800})
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
    assert_eq!(names, vec!["cpu", "slow-links"]);
    Ok(())
}
