//! Projects, members and roles; every operation of the OpenAPI document
//! called with a token of each role.

use std::collections::BTreeMap;

use anyhow::{anyhow, Result};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use ud_gateway::access::{self, Access};

use crate::common::{task, Stack};

/// The callers, from no role in the project to admin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Who {
    Outsider,
    Viewer,
    Member,
    Owner,
    Admin,
}

impl Who {
    const ALL: [Who; 5] = [
        Who::Outsider,
        Who::Viewer,
        Who::Member,
        Who::Owner,
        Who::Admin,
    ];

    /// Whether the operation lets this caller through.
    fn allowed(self, access: Access) -> bool {
        match access {
            Access::Public | Access::Signed => true,
            Access::Viewer => self >= Who::Viewer,
            Access::Member => self >= Who::Member,
            Access::Owner => self >= Who::Owner,
            Access::Admin => self == Who::Admin,
        }
    }
}

async fn call(
    s: &Stack,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Result<(StatusCode, Value)> {
    let mut req = s.http.request(method, s.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await?;
    let status = resp.status();
    let body = resp.json().await.unwrap_or(Value::Null);
    Ok((status, body))
}

/// Issues a token for a user through the API.
async fn user_token(s: &Stack, user: &str, extra: Value) -> Result<(StatusCode, Value)> {
    let mut body = json!({"name": format!("{user}-laptop"), "user": user});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    call(
        s,
        Method::POST,
        "/api/v1/tokens",
        Some(&s.admin),
        Some(body),
    )
    .await
}

async fn secret_of(s: &Stack, user: &str) -> Result<String> {
    let (status, v) = user_token(s, user, json!({})).await?;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    Ok(v["token"].as_str().unwrap_or_default().to_owned())
}

/// A project `lab` owned by olive, with mike a member and vera a viewer;
/// otto is a member of nothing.
async fn team(s: &Stack) -> Result<BTreeMap<Who, String>> {
    let (status, v) = call(
        s,
        Method::POST,
        "/api/v1/projects",
        Some(&s.admin),
        Some(json!({"name": "lab", "description": "vision", "owner": "olive"})),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let owner = secret_of(s, "olive").await?;
    for (user, role) in [("mike", "member"), ("vera", "viewer")] {
        let (status, v) = call(
            s,
            Method::PUT,
            &format!("/api/v1/projects/lab/members/{user}"),
            Some(&owner),
            Some(json!({"role": role})),
        )
        .await?;
        assert_eq!(status, StatusCode::OK, "{v}");
    }
    Ok(BTreeMap::from([
        (Who::Outsider, secret_of(s, "otto").await?),
        (Who::Viewer, secret_of(s, "vera").await?),
        (Who::Member, secret_of(s, "mike").await?),
        (Who::Owner, owner),
        (Who::Admin, s.admin.clone()),
    ]))
}

fn pipeline() -> Value {
    let mut defaults = task("lab");
    if let Some(o) = defaults.as_object_mut() {
        o.remove("project");
        o.remove("name");
    }
    json!({"project": "lab", "name": "nightly", "defaults": defaults,
           "steps": [{"name": "a", "command": ["true"]}]})
}

fn schedule() -> Value {
    json!({"name": "nightly", "cron": "0 3 * * *", "timezone": "Europe/Berlin", "task": task("lab")})
}

/// Things of the project to name in paths, made by the member.
struct Fixtures {
    task: String,
    pipeline: String,
    schedule: String,
    node: String,
    token: String,
}

async fn fixtures(s: &Stack, member: &str) -> Result<Fixtures> {
    let id = |v: &Value, key: &str| -> Result<String> {
        v[key]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("no {key} in {v}"))
    };
    let (_, t) = call(
        s,
        Method::POST,
        "/api/v1/tasks?wait=projected",
        Some(member),
        Some(task("lab")),
    )
    .await?;
    let (_, p) = call(
        s,
        Method::POST,
        "/api/v1/pipelines?wait=projected",
        Some(member),
        Some(pipeline()),
    )
    .await?;
    let (_, sc) = call(
        s,
        Method::POST,
        "/api/v1/schedules?wait=projected",
        Some(member),
        Some(schedule()),
    )
    .await?;
    let (_, n) = call(
        s,
        Method::POST,
        "/api/v1/nodes",
        Some(&s.admin),
        Some(json!({"name": "gpu-1"})),
    )
    .await?;
    let (_, tk) = user_token(s, "nobody", json!({})).await?;
    Ok(Fixtures {
        task: id(&t, "task_id")?,
        pipeline: id(&p, "pipeline_id")?,
        schedule: id(&sc, "schedule_id")?,
        node: id(&n, "node_id")?,
        token: id(&tk, "id")?,
    })
}

/// The operation's path with its parameters filled in.
fn concrete(path: &str, f: &Fixtures) -> String {
    let id = if path.starts_with("/api/v1/tasks/") {
        &f.task
    } else if path.starts_with("/api/v1/pipelines/") {
        &f.pipeline
    } else if path.starts_with("/api/v1/schedules/") {
        &f.schedule
    } else if path.starts_with("/api/v1/nodes/") {
        &f.node
    } else {
        &f.token
    };
    let name = if path.contains("/webhooks/") {
        "hook"
    } else {
        "API_KEY"
    };
    path.replace("{id}", id)
        .replace("{project}", "lab")
        .replace("{queue}", "default")
        .replace("{name}", name)
        .replace("{user}", "newbie")
        .replace("{path}", "data/x.txt")
        .replace("{upload_id}", "0190f5b0-0000-7000-8000-000000000001")
        .replace("{port}", "8888")
}

/// A body the operation takes (valid, so that a refusal is the role's).
fn body_for(method: &str, path: &str) -> Option<Value> {
    Some(match (method, path) {
        ("post", "/api/v1/tasks") => task("lab"),
        ("post", "/api/v1/pipelines") => pipeline(),
        ("post", "/api/v1/schedules") => schedule(),
        ("post", "/api/v1/projects") => json!({"name": "lab2", "owner": "olive"}),
        ("put", "/api/v1/projects/{project}/members/{user}") => json!({"role": "viewer"}),
        ("put", "/api/v1/projects/{project}/secrets/{name}") => json!({"value": "s3cret"}),
        ("post", "/api/v1/projects/{project}/webhooks") => {
            json!({"name": "hook", "url": "http://127.0.0.1:9/x", "events": ["task.failed"]})
        }
        ("post", "/api/v1/projects/{project}/uploads") => {
            json!({"path": "data/x.txt", "size_bytes": 3})
        }
        ("post", "/api/v1/projects/{project}/uploads/{upload_id}/complete") => {
            json!({"path": "data/x.txt", "size_bytes": 3})
        }
        ("put", "/api/v1/projects/{project}/quota") => json!({"max_gpus": 8}),
        ("put", "/api/v1/queues/{queue}") => json!({"max_running": 10}),
        ("post", "/api/v1/tokens") => json!({"name": "ci", "user": "olive"}),
        ("post", "/api/v1/nodes") => json!({"name": "gpu-2"}),
        ("post", "/api/v1/tasks/{id}/priority") => json!({"priority": 5}),
        ("post", _) => json!({}),
        _ => return None,
    })
}

#[tokio::test]
async fn every_operation_refuses_exactly_the_roles_below_its_rule() -> Result<()> {
    let s = Stack::start().await?;
    let doc = ud_gateway::openapi::document();
    let doc: Value = serde_json::to_value(&doc)?;
    let tokens = team(&s).await?;
    let f = fixtures(&s, &tokens[&Who::Member]).await?;

    // Every operation of the document has a rule, and every rule an operation.
    let mut ops: Vec<(String, String, Access)> = Vec::new();
    let mut queries: BTreeMap<(String, String), String> = BTreeMap::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for (method, op) in item.as_object().into_iter().flatten() {
            // Required query parameters, filled in.
            let query: Vec<String> = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["in"] == "query" && p["required"] == true)
                .filter_map(|p| p["name"].as_str())
                .map(|n| format!("{n}={}", if n == "path" { "data/x.txt" } else { "1" }))
                .collect();
            queries.insert((method.clone(), path.clone()), query.join("&"));
            let named = op["x-unidesk-access"].as_str();
            let access = access::rule(method, path);
            assert!(
                access.is_some() && named == access.map(Access::as_str),
                "{method} {path} has no access rule (add it to gateway/src/access.rs)"
            );
            if let Some(a) = access {
                ops.push((method.clone(), path.clone(), a));
            }
        }
    }
    for (method, path, _) in access::RULES {
        assert!(
            ops.iter().any(|(m, p, _)| m == method && p == path),
            "rule for {method} {path}: no such operation in the document"
        );
    }
    // What ends things runs last: deletions, then archiving the project.
    ops.sort_by_key(|(m, p, _)| (p.ends_with("/archive"), m == "delete", p.clone()));

    let mut checked = 0;
    for (method, path, access) in &ops {
        let mut url = concrete(path, &f);
        if let Some(q) = queries
            .get(&(method.clone(), path.clone()))
            .filter(|q| !q.is_empty())
        {
            url = format!("{url}?{q}");
        }
        let m: Method = method.to_uppercase().parse()?;
        let socket = path.ends_with("/exec") || path.contains("/ports/") || path.ends_with("/live");
        let send = |token: Option<&str>| {
            let mut req = s.http.request(m.clone(), s.url(&url));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            if socket {
                req = req
                    .header("connection", "upgrade")
                    .header("upgrade", "websocket")
                    .header("sec-websocket-version", "13")
                    .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
            }
            if let Some(b) = body_for(method, path) {
                req = req.json(&b);
            }
            req.send()
        };
        // The live socket takes its token in its first message (browsers
        // cannot set headers on a WebSocket).
        if *access != Access::Public && !path.ends_with("/live") {
            let resp = send(None).await?;
            assert_eq!(
                resp.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {path} without a token"
            );
        }
        for who in Who::ALL {
            let resp = send(Some(&tokens[&who])).await?;
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            if who.allowed(*access) {
                assert!(
                    status != StatusCode::FORBIDDEN && status != StatusCode::UNAUTHORIZED,
                    "{method} {path} ({}) refused {who:?}: {status} {text}",
                    access.as_str()
                );
            } else {
                // A project one may not see answers as if it did not exist.
                let refused = status == StatusCode::FORBIDDEN
                    || (who == Who::Outsider && status == StatusCode::NOT_FOUND);
                assert!(
                    refused,
                    "{method} {path} ({}) let {who:?} through: {status} {text}",
                    access.as_str()
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 5 * 60, "only {checked} calls");
    Ok(())
}

#[tokio::test]
async fn members_change_their_own_tasks_and_owners_manage_the_team() -> Result<()> {
    let s = Stack::start().await?;
    let tokens = team(&s).await?;
    let (owner, member, viewer) = (
        &tokens[&Who::Owner],
        &tokens[&Who::Member],
        &tokens[&Who::Viewer],
    );
    // The owner's task: the member may read it but not cancel it.
    let (_, t) = call(
        &s,
        Method::POST,
        "/api/v1/tasks?wait=projected",
        Some(owner),
        Some(task("lab")),
    )
    .await?;
    let id = t["task_id"].as_str().unwrap_or_default().to_owned();
    let (status, v) = call(
        &s,
        Method::GET,
        &format!("/api/v1/tasks/{id}"),
        Some(member),
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["submitted_by"], "user:olive", "{v}");
    let (status, v) = call(
        &s,
        Method::POST,
        &format!("/api/v1/tasks/{id}/cancel"),
        Some(member),
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    assert!(
        v["message"].as_str().unwrap_or_default().contains("own"),
        "{v}"
    );
    // The member's own: cancelled.
    let (_, t) = call(
        &s,
        Method::POST,
        "/api/v1/tasks?wait=projected",
        Some(member),
        Some(task("lab")),
    )
    .await?;
    let own = t["task_id"].as_str().unwrap_or_default().to_owned();
    let (status, v) = call(
        &s,
        Method::POST,
        &format!("/api/v1/tasks/{own}/cancel"),
        Some(member),
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");

    // The same for the owner's pipeline and schedule.
    let (_, pl) = call(
        &s,
        Method::POST,
        "/api/v1/pipelines?wait=projected",
        Some(owner),
        Some(pipeline()),
    )
    .await?;
    let pl = pl["pipeline_id"].as_str().unwrap_or_default().to_owned();
    let (status, v) = call(
        &s,
        Method::POST,
        &format!("/api/v1/pipelines/{pl}/cancel"),
        Some(member),
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    let (_, sc) = call(
        &s,
        Method::POST,
        "/api/v1/schedules?wait=projected",
        Some(owner),
        Some(schedule()),
    )
    .await?;
    let sc = sc["schedule_id"].as_str().unwrap_or_default().to_owned();
    let (status, v) = call(
        &s,
        Method::POST,
        &format!("/api/v1/schedules/{sc}/pause"),
        Some(member),
        Some(json!({})),
    )
    .await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    // A webhook's URL may be a credential: the viewer sees where it goes.
    let hook = json!({"name": "chat", "url": "https://hooks.example.org/services/T0/B0/key", "events": ["task.failed"]});
    let (status, v) = call(
        &s,
        Method::POST,
        "/api/v1/projects/lab/webhooks",
        Some(owner),
        Some(hook),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let (_, seen) = call(
        &s,
        Method::GET,
        "/api/v1/projects/lab/webhooks",
        Some(viewer),
        None,
    )
    .await?;
    assert_eq!(seen[0]["url"], "https://hooks.example.org/…", "{seen}");
    let (_, seen) = call(
        &s,
        Method::GET,
        "/api/v1/projects/lab/webhooks",
        Some(owner),
        None,
    )
    .await?;
    assert_eq!(
        seen[0]["url"], "https://hooks.example.org/services/T0/B0/key",
        "{seen}"
    );

    // Promoted to owner, the viewer may cancel anyone's task at once.
    let (status, v) = call(
        &s,
        Method::PUT,
        "/api/v1/projects/lab/members/vera",
        Some(owner),
        Some(json!({"role": "owner"})),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, v) = call(
        &s,
        Method::POST,
        &format!("/api/v1/tasks/{id}/cancel"),
        Some(viewer),
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");

    // Bad input: a role that does not exist, a bad user name; nothing appended.
    let auth_before = s
        .server
        .state
        .commands
        .store()
        .jetstream()
        .get_stream("UD_AUTH")
        .await?
        .info()
        .await?
        .state
        .messages;
    let (status, v) = call(
        &s,
        Method::PUT,
        "/api/v1/projects/lab/members/bob",
        Some(owner),
        Some(json!({"role": "boss"})),
    )
    .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(v.to_string().contains("role"), "{v}");
    let (status, v) = call(
        &s,
        Method::PUT,
        "/api/v1/projects/lab/members/Bob%20Smith",
        Some(owner),
        Some(json!({"role": "member"})),
    )
    .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(v.to_string().contains("user"), "{v}");
    let (status, v) = call(
        &s,
        Method::POST,
        "/api/v1/projects",
        Some(&s.admin),
        Some(json!({"name": "Lab!", "owner": "olive"})),
    )
    .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let auth_after = s
        .server
        .state
        .commands
        .store()
        .jetstream()
        .get_stream("UD_AUTH")
        .await?
        .info()
        .await?
        .state
        .messages;
    assert_eq!(auth_before, auth_after, "bad input appended events");

    // A member's live connection ends once the member is removed (the
    // client connects again, seeing what its roles let it see now).
    let mut live = crate::live::connect(&s, json!({"token": member, "tasks": {}})).await?;
    let ready = crate::live::next(&mut live).await?;
    assert_eq!(ready["type"], "ready", "{ready}");

    // The last owner cannot leave; with another owner they can.
    let (status, _) = call(
        &s,
        Method::DELETE,
        "/api/v1/projects/lab/members/mike",
        Some(owner),
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, v) = call(
        &s,
        Method::DELETE,
        "/api/v1/projects/lab/members/vera",
        Some(owner),
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
    let (status, v) = call(
        &s,
        Method::DELETE,
        "/api/v1/projects/lab/members/olive",
        Some(owner),
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or_default()
            .contains("last owner"),
        "{v}"
    );
    let (error, code) = crate::live::closed_with(&mut live).await?;
    assert_eq!(
        (code, error["error"].as_str()),
        (4503, Some("roles_changed")),
        "{error}"
    );
    // Removed, mike sees the project no more.
    let (status, _) = call(
        &s,
        Method::GET,
        &format!("/api/v1/tasks/{own}"),
        Some(member),
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, list) = call(&s, Method::GET, "/api/v1/projects", Some(member), None).await?;
    assert_eq!(list, json!([]));
    let (_, list) = call(&s, Method::GET, "/api/v1/projects", Some(owner), None).await?;
    assert_eq!(list[0]["name"], "lab", "{list}");
    assert_eq!(list[0]["your_role"], "owner", "{list}");
    assert_eq!(
        list[0]["members"].as_array().map(Vec::len),
        Some(1),
        "{list}"
    );

    // Archived, the project is read-only for its owner too.
    let (status, _) = call(
        &s,
        Method::POST,
        "/api/v1/projects/lab/archive",
        Some(&s.admin),
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    for who in [owner, &s.admin] {
        let (status, v) = call(
            &s,
            Method::POST,
            "/api/v1/tasks",
            Some(who),
            Some(task("lab")),
        )
        .await?;
        assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    }
    // Its schedules stopped.
    let (_, shown) = call(
        &s,
        Method::GET,
        &format!("/api/v1/schedules/{sc}"),
        Some(owner),
        None,
    )
    .await?;
    assert_eq!(shown["state"], "paused", "{shown}");
    assert_eq!(shown["paused_reason"], "project lab archived", "{shown}");
    let (status, _) = call(
        &s,
        Method::GET,
        &format!("/api/v1/tasks/{own}"),
        Some(owner),
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn tokens_expire_show_their_last_use_and_are_revoked_by_name() -> Result<()> {
    let s = Stack::start().await?;
    let (status, v) = user_token(&s, "ada", json!({"expires_in_days": 0})).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(v.to_string().contains("expires_in_days"), "{v}");
    let (status, v) = user_token(&s, "Ada Lovelace", json!({})).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(v.to_string().contains("user"), "{v}");

    let (status, v) = user_token(&s, "ada", json!({"expires_in_days": 30})).await?;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let laptop = v["token"].as_str().unwrap_or_default().to_owned();
    let expires: chrono::DateTime<chrono::Utc> =
        v["expires_at"].as_str().unwrap_or_default().parse()?;
    let days = (expires - chrono::Utc::now()).num_hours() as f64 / 24.0;
    assert!((29.9..=30.0).contains(&days), "{days}");
    let ci = secret_of(&s, "grace").await?;

    // Used once: the listing shows when. Ada sees her own tokens only.
    let (status, _) = call(&s, Method::GET, "/api/v1/tasks", Some(&laptop), None).await?;
    assert_eq!(status, StatusCode::OK);
    let mine = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let (_, list) = call(&s, Method::GET, "/api/v1/tokens", Some(&laptop), None).await?;
            if list[0]["last_used_at"].is_string() {
                return anyhow::Ok(list);
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await??;
    assert_eq!(mine.as_array().map(Vec::len), Some(1), "{mine}");
    assert_eq!(mine[0]["name"], "ada-laptop", "{mine}");
    assert_eq!(mine[0]["user"], "ada", "{mine}");

    // Ada cannot revoke Grace's token, by name or id; the admin can, by name.
    let (status, _) = call(
        &s,
        Method::DELETE,
        "/api/v1/tokens/grace-laptop",
        Some(&laptop),
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call(
        &s,
        Method::DELETE,
        "/api/v1/tokens/grace-laptop",
        Some(&s.admin),
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = call(&s, Method::GET, "/api/v1/tasks", Some(&ci), None).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Two active tokens of one name: revoking by name asks for the id.
    let (_, second) = user_token(&s, "ada", json!({})).await?;
    let (status, v) = call(
        &s,
        Method::DELETE,
        "/api/v1/tokens/ada-laptop",
        Some(&laptop),
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    let second_id = second["id"].as_str().unwrap_or_default();
    assert!(
        v["message"]
            .as_str()
            .unwrap_or_default()
            .contains(second_id),
        "{v}"
    );
    // Ada revokes her own token by its id; it stops working at once.
    let (status, _) = call(
        &s,
        Method::DELETE,
        &format!("/api/v1/tokens/{second_id}"),
        Some(&laptop),
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, v) = call(
        &s,
        Method::GET,
        "/api/v1/tokens?all=true",
        Some(&s.admin),
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::OK);
    let revoked = v
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| !t["active"].as_bool().unwrap_or(true))
        .count();
    assert_eq!(revoked, 2, "{v}");
    Ok(())
}

#[tokio::test]
async fn an_expired_token_is_refused() -> Result<()> {
    let s = Stack::start().await?;
    // Issued straight into the store with an expiry a moment away.
    let issued = ud_core::commands::issue_token(
        s.server.state.commands.store(),
        &ud_core::commands::NewToken {
            name: "short".into(),
            user: Some("ada".into()),
            expires_at: Some(ud_schemas::now_millis() + 1_500),
            ..Default::default()
        },
        "test",
    )
    .await
    .map_err(|e| anyhow!("{e}"))?;
    s.server
        .state
        .projected
        .wait("UD_AUTH", issued.seq, std::time::Duration::from_secs(10))
        .await;
    let (status, _) = call(&s, Method::GET, "/api/v1/tasks", Some(&issued.secret), None).await?;
    assert_eq!(status, StatusCode::OK);
    let until = ud_schemas::now_millis() + 1_500;
    while ud_schemas::now_millis() <= until {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (status, v) = call(&s, Method::GET, "/api/v1/tasks", Some(&issued.secret), None).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or_default()
            .contains("expired"),
        "{v}"
    );
    Ok(())
}
