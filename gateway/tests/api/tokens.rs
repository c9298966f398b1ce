//! Tokens: required, scoped to projects, revocable.

use anyhow::Result;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{task, Stack};

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
