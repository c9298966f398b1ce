//! Project files through the API against a real Garage: presigned uploads
//! (one PUT and multipart, resumed after a cut), listing, downloads,
//! project isolation, quota, bad paths and the store being down.

use anyhow::{ensure, Result};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use ud_testkit::Garage;

use crate::common::Stack;

const MIB: u64 = 1024 * 1024;

pub fn settings(g: &Garage, quota_mb: Option<u64>) -> ud_storage::StorageSettings {
    let mut s = ud_storage::StorageSettings::path_style(
        &g.endpoint,
        &g.region,
        &g.bucket,
        &g.access_key_id,
        &g.secret_access_key,
    );
    s.project_quota_bytes = quota_mb.map(|m| m * MIB);
    s
}

async fn start() -> Result<(Garage, Stack)> {
    let g = Garage::start().await?;
    let storage = ud_storage::Storage::new(settings(&g, Some(64)))?;
    let stack = Stack::start_with(Some(storage)).await?;
    Ok((g, stack))
}

async fn call(
    stack: &Stack,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Result<(StatusCode, Value)> {
    let mut req = stack
        .http
        .request(method, stack.url(path))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await?;
    let status = resp.status();
    let text = resp.text().await?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

fn bytes(n: u64, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test]
async fn small_and_large_files_go_straight_to_the_store_and_come_back() -> Result<()> {
    let (_g, stack) = start().await?;
    let lab = stack.token(&["lab"]).await?;
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;

    // One PUT for a small file.
    let hello = b"hello world".to_vec();
    let (status, plan) = call(
        &stack,
        &lab,
        post.clone(),
        "/api/v1/projects/lab/uploads",
        Some(json!({"path": "data/hello.txt", "size_bytes": hello.len()})),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED, "{plan}");
    assert_eq!(plan["kind"], "single");
    let url = plan["url"]["url"].as_str().unwrap_or_default().to_owned();
    assert!(
        !url.contains(&stack.base),
        "bytes must not go through the gateway"
    );
    let put = stack.http.put(&url).body(hello.clone()).send().await?;
    assert!(put.status().is_success(), "{}", put.text().await?);
    // The URL names one object: the same signature for another key is refused.
    let other = url.replacen("data/hello.txt", "data/evil.txt", 1);
    assert_eq!(
        stack.http.put(&other).body("x").send().await?.status(),
        StatusCode::FORBIDDEN
    );

    // A 40 MiB file in parts; the link drops after parts 1 and 3.
    let big = bytes(40 * MIB, 7);
    let (status, plan) = call(
        &stack,
        &lab,
        post.clone(),
        "/api/v1/projects/lab/uploads",
        Some(json!({"path": "data/big.bin", "size_bytes": big.len()})),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED, "{plan}");
    assert_eq!(plan["kind"], "multipart");
    let part_size = plan["part_size"].as_u64().unwrap_or(0) as usize;
    let upload_id = plan["upload_id"].as_str().unwrap_or_default().to_owned();
    let parts = plan["parts"].as_array().cloned().unwrap_or_default();
    assert_eq!(parts.len(), 3);
    let send_part = |number: u64, url: String| {
        let start = (number as usize - 1) * part_size;
        let chunk = big[start..(start + part_size).min(big.len())].to_vec();
        let http = stack.http.clone();
        async move { http.put(url).body(chunk).send().await }
    };
    for p in parts.iter().filter(|p| p["number"] != 2) {
        let r = send_part(
            p["number"].as_u64().unwrap_or(0),
            p["url"]["url"].as_str().unwrap_or_default().to_owned(),
        )
        .await?;
        assert!(r.status().is_success());
    }
    // Completing now would store a file with a hole: refused.
    let complete = format!("/api/v1/projects/lab/uploads/{upload_id}/complete");
    let (status, body) = call(
        &stack,
        &lab,
        post.clone(),
        &complete,
        Some(json!({"path": "data/big.bin", "size_bytes": big.len()})),
    )
    .await?;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("missing parts"),
        "{body}"
    );
    // Resume: the store has parts 1 and 3; only part 2 is left, with a fresh URL.
    let resume = format!(
        "/api/v1/projects/lab/uploads/{upload_id}?path=data/big.bin&size_bytes={}",
        big.len()
    );
    let (status, plan) = call(&stack, &lab, get.clone(), &resume, None).await?;
    assert_eq!(status, StatusCode::OK, "{plan}");
    assert_eq!(plan["done"], json!([1, 3]));
    let left = plan["parts"].as_array().cloned().unwrap_or_default();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["number"], 2);
    assert!(send_part(
        2,
        left[0]["url"]["url"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    )
    .await?
    .status()
    .is_success());
    let (status, body) = call(
        &stack,
        &lab,
        post.clone(),
        &complete,
        Some(json!({"path": "data/big.bin", "size_bytes": big.len()})),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["size"].as_u64(), Some(40 * MIB));

    // Listed, and downloaded byte for byte.
    let (status, list) = call(
        &stack,
        &lab,
        get.clone(),
        "/api/v1/projects/lab/files?prefix=data",
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{list}");
    let names: Vec<&str> = list["files"]
        .as_array()
        .map(|f| f.iter().filter_map(|x| x["path"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, vec!["data/big.bin", "data/hello.txt"]);
    assert_eq!(list["used_bytes"].as_u64(), Some(40 * MIB + 11));
    let (status, dl) = call(
        &stack,
        &lab,
        get.clone(),
        "/api/v1/projects/lab/files/data/big.bin",
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{dl}");
    let got = stack
        .http
        .get(dl["download"]["url"].as_str().unwrap_or_default())
        .send()
        .await?
        .bytes()
        .await?;
    ensure!(
        Sha256::digest(&got) == Sha256::digest(&big),
        "downloaded bytes differ"
    );
    let (_, dl) = call(
        &stack,
        &lab,
        get.clone(),
        "/api/v1/projects/lab/files/data/hello.txt",
        None,
    )
    .await?;
    let got = stack
        .http
        .get(dl["download"]["url"].as_str().unwrap_or_default())
        .send()
        .await?
        .bytes()
        .await?;
    assert_eq!(got.as_ref(), hello.as_slice());
    // A download URL is for reading only.
    assert_eq!(
        stack
            .http
            .put(dl["download"]["url"].as_str().unwrap_or_default())
            .body("x")
            .send()
            .await?
            .status(),
        StatusCode::FORBIDDEN
    );
    Ok(())
}

#[tokio::test]
async fn projects_quota_paths_and_a_store_that_is_down() -> Result<()> {
    let (mut g, stack) = start().await?;
    let lab = stack.token(&["lab"]).await?;
    let other = stack.token(&["other"]).await?;
    let post = reqwest::Method::POST;
    let get = reqwest::Method::GET;

    // Another project's files are not there for this token.
    let (status, _) = call(
        &stack,
        &other,
        get.clone(),
        "/api/v1/projects/lab/files",
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call(
        &stack,
        &other,
        post.clone(),
        "/api/v1/projects/lab/uploads",
        Some(json!({"path": "x", "size_bytes": 1})),
    )
    .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call(
        &stack,
        &lab,
        get.clone(),
        "/api/v1/projects/lab/files/nothing-here",
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Paths that would leave the project's files.
    for bad in ["../other/x", "/etc/passwd", "a//b", ""] {
        let (status, body) = call(
            &stack,
            &lab,
            post.clone(),
            "/api/v1/projects/lab/uploads",
            Some(json!({"path": bad, "size_bytes": 1})),
        )
        .await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(body["fields"][0]["field"], "path", "{body}");
    }

    // Over the quota (64 MiB): refused before anything is written.
    let (status, body) = call(
        &stack,
        &lab,
        post.clone(),
        "/api/v1/projects/lab/uploads",
        Some(json!({"path": "huge.bin", "size_bytes": 65 * MIB})),
    )
    .await?;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["error"], "quota_exceeded");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("project lab"),
        "{body}"
    );
    let (_, list) = call(
        &stack,
        &lab,
        get.clone(),
        "/api/v1/projects/lab/files",
        None,
    )
    .await?;
    assert_eq!(list["files"], json!([]));

    // The store down: a clear 503, and working again once it is back.
    let ready = stack.http.get(stack.url("/readyz")).send().await?;
    assert_eq!(ready.status(), StatusCode::OK);
    assert_eq!(ready.json::<Value>().await?["object_store"]["status"], "ok");
    g.stop().await?;
    let (status, body) = call(
        &stack,
        &lab,
        get.clone(),
        "/api/v1/projects/lab/files",
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("object storage"),
        "{body}"
    );
    // Health says which dependency is down, and so do the metrics.
    let ready = stack.http.get(stack.url("/readyz")).send().await?;
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = ready.json().await?;
    assert_eq!(body["object_store"]["status"], "down", "{body}");
    assert_eq!(body["postgres"]["status"], "ok");
    assert_eq!(body["nats"]["status"], "ok");
    let metrics = stack
        .http
        .get(stack.url("/metrics"))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("unidesk_dependency_up{dependency=\"object_store\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("unidesk_dependency_up{dependency=\"postgres\"} 1"),
        "{metrics}"
    );
    g.restart().await?;
    let (status, body) = call(
        &stack,
        &lab,
        get.clone(),
        "/api/v1/projects/lab/files",
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        stack.http.get(stack.url("/readyz")).send().await?.status(),
        StatusCode::OK
    );
    Ok(())
}

#[tokio::test]
async fn without_an_object_store_file_calls_say_so() -> Result<()> {
    let stack = Stack::start().await?;
    let lab = stack.token(&["lab"]).await?;
    let (status, body) = call(
        &stack,
        &lab,
        reqwest::Method::GET,
        "/api/v1/projects/lab/files",
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"], "no_object_store");
    let ready: Value = stack
        .http
        .get(stack.url("/readyz"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["object_store"]["status"], "not_configured");
    Ok(())
}
