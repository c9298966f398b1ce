//! Project secrets through the API: write-only, versioned, scoped to the
//! projects a token may use, checked when a task names them.

use anyhow::Result;
use reqwest::StatusCode;
use serde_json::{json, Value};
use ud_server::ServerConfig;
use ud_testkit::{NatsServer, PgDatabase};

use crate::common::{task, Stack};

async fn put(
    s: &Stack,
    token: &str,
    project: &str,
    name: &str,
    body: Value,
) -> Result<(StatusCode, Value)> {
    let resp = s
        .http
        .put(s.url(&format!("/api/v1/projects/{project}/secrets/{name}")))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await?;
    Ok((resp.status(), resp.json().await.unwrap_or(Value::Null)))
}

async fn get(s: &Stack, token: &str, path: &str) -> Result<(StatusCode, Value)> {
    let resp = s.http.get(s.url(path)).bearer_auth(token).send().await?;
    Ok((resp.status(), resp.json().await.unwrap_or(Value::Null)))
}

async fn submit(s: &Stack, token: &str, body: &Value) -> Result<(StatusCode, Value)> {
    let resp = s
        .http
        .post(s.url("/api/v1/tasks"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await?;
    Ok((resp.status(), resp.json().await.unwrap_or(Value::Null)))
}

#[tokio::test]
async fn secrets_are_set_in_versions_listed_without_values_and_scoped() -> Result<()> {
    let s = Stack::start().await?;
    let lab = s.token(&["lab"]).await?;
    let other = s.token(&["other"]).await?;

    let (status, v) = put(&s, &lab, "lab", "WANDB_API_KEY", json!({"value": "first"})).await?;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["version"], 1);
    assert_eq!(v["updated_by"], "token:user-lab");
    let (_, v) = put(&s, &lab, "lab", "WANDB_API_KEY", json!({"value": "second"})).await?;
    assert_eq!(v["version"], 2);

    // Listed by name and version; the value is never given back.
    let (status, list) = get(&s, &lab, "/api/v1/projects/lab/secrets").await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["secrets"].as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list["secrets"][0]["name"], "WANDB_API_KEY");
    assert_eq!(list["secrets"][0]["project"], "lab");
    assert!(!list.to_string().contains("second") && !list.to_string().contains("first"));

    // Another project's token sees nothing of it and cannot set it.
    let (status, _) = get(&s, &other, "/api/v1/projects/lab/secrets").await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = put(&s, &other, "lab", "WANDB_API_KEY", json!({"value": "x"})).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, all) = get(&s, &other, "/api/v1/secrets").await?;
    assert_eq!(all["secrets"], json!([]), "{all}");
    let (_, all) = get(&s, &s.admin, "/api/v1/secrets").await?;
    assert_eq!(all["secrets"].as_array().map(Vec::len), Some(1), "{all}");

    // Bad names and values are refused, naming the field.
    for (name, body, field) in [
        ("has-dash", json!({"value": "x"}), "name"),
        ("1ABC", json!({"value": "x"}), "name"),
        ("OK", json!({"value": ""}), "value"),
    ] {
        let (status, v) = put(&s, &lab, "lab", name, body).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name}: {v}");
        assert_eq!(v["fields"][0]["field"], field, "{name}: {v}");
    }
    let (status, v) = put(&s, &lab, "lab", "OK", json!({"value": "x", "extra": 1})).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");

    // Deleted: gone from the list; deleting again is not found; setting it
    // again goes on from the last version.
    let resp = s
        .http
        .delete(s.url("/api/v1/projects/lab/secrets/WANDB_API_KEY"))
        .bearer_auth(&lab)
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let (_, list) = get(&s, &lab, "/api/v1/projects/lab/secrets").await?;
    assert_eq!(list["secrets"], json!([]), "{list}");
    let resp = s
        .http
        .delete(s.url("/api/v1/projects/lab/secrets/WANDB_API_KEY"))
        .bearer_auth(&lab)
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let (_, v) = put(&s, &lab, "lab", "WANDB_API_KEY", json!({"value": "third"})).await?;
    assert!(v["version"].as_u64() > Some(2), "{v}");
    Ok(())
}

#[tokio::test]
async fn a_task_naming_a_secret_that_is_not_set_is_refused_and_nothing_is_stored() -> Result<()> {
    let s = Stack::start().await?;
    let lab = s.token(&["lab"]).await?;
    let before = s.tasks_in_stream().await?;
    let mut body = task("lab");
    body["secrets"] = json!(["HF_TOKEN"]);
    let (status, v) = submit(&s, &lab, &body).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["fields"][0]["field"], "secrets[0]", "{v}");
    let reason = v["fields"][0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("HF_TOKEN") && reason.contains("unidesk secret set"),
        "{v}"
    );
    // Named in env as well, or twice: refused.
    put(&s, &lab, "lab", "HF_TOKEN", json!({"value": "hf_x"})).await?;
    body["env"] = json!({"HF_TOKEN": "plain"});
    let (status, v) = submit(&s, &lab, &body).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(s.tasks_in_stream().await?, before);
    // Set, it is accepted; the task shows the name only.
    body["env"] = json!({});
    let (status, v) = submit(&s, &lab, &body).await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    // A secret of another project is not set for this one.
    put(&s, &s.admin, "other", "ONLY_OTHER", json!({"value": "o"})).await?;
    body["secrets"] = json!(["ONLY_OTHER"]);
    let (status, v) = submit(&s, &lab, &body).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    Ok(())
}

#[tokio::test]
async fn without_a_key_secrets_are_unavailable_and_tasks_cannot_name_them() -> Result<()> {
    let (nats, pg) = (NatsServer::start().await?, PgDatabase::create().await?);
    let cfg = ServerConfig::local(nats.url(), pg.url.clone());
    let s = Stack::start_config(nats, pg, cfg).await?;
    let (status, v) = put(&s, &s.admin, "lab", "TOKEN", json!({"value": "x"})).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"], "no_secret_key");
    let mut body = task("lab");
    body["secrets"] = json!(["TOKEN"]);
    let (status, v) = submit(&s, &s.admin, &body).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(v.to_string().contains("UD_SECRETS_KEY_FILE"), "{v}");
    Ok(())
}
