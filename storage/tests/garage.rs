//! The storage abstraction against a real Garage: presigned URLs name one
//! object and one method and stop working when they expire.

use std::time::Duration;

use anyhow::Result;
use ud_storage::{Storage, StorageSettings};
use ud_testkit::Garage;

fn storage(g: &Garage, ttl: Duration) -> Result<Storage> {
    let mut s = StorageSettings::path_style(
        &g.endpoint,
        &g.region,
        &g.bucket,
        &g.access_key_id,
        &g.secret_access_key,
    );
    s.url_ttl = ttl;
    Ok(Storage::new(s)?)
}

#[tokio::test]
async fn presigned_urls_are_for_one_object_one_method_and_expire() -> Result<()> {
    let g = Garage::start().await?;
    let s = storage(&g, Duration::from_secs(600))?;
    s.check().await?;
    let http = reqwest::Client::new();
    let key = "projects/lab/files/a.txt";

    let put = s.presign_put(key, 5, Duration::from_secs(60)).await?;
    assert_eq!(put.method, "PUT");
    // The signed length is enforced: a longer body is refused.
    assert!(!http
        .put(&put.url)
        .body("too long")
        .send()
        .await?
        .status()
        .is_success());
    assert!(http
        .put(&put.url)
        .body("hello")
        .send()
        .await?
        .status()
        .is_success());
    assert_eq!(s.head(key).await?.map(|o| o.size), Some(5));
    assert_eq!(s.head("projects/lab/files/none").await?, None);

    let get = s.presign_get(key, Duration::from_secs(60)).await?;
    assert_eq!(http.get(&get.url).send().await?.text().await?, "hello");
    // Not for another method, nor another object.
    assert_eq!(
        http.delete(&get.url).send().await?.status(),
        reqwest::StatusCode::FORBIDDEN
    );
    assert_eq!(
        http.get(get.url.replacen("a.txt", "b.txt", 1))
            .send()
            .await?
            .status(),
        reqwest::StatusCode::FORBIDDEN
    );

    // A URL asked for longer than the setting lives only as long as the setting.
    let short = storage(&g, Duration::from_secs(1))?;
    let url = short.presign_get(key, Duration::from_secs(3600)).await?;
    assert!(url.expires_at - ud_schemas::now_millis() <= 1000);
    assert!(http.get(&url.url).send().await?.status().is_success());
    // Wait out the second it is valid for.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = http.get(&url.url).send().await?;
    assert!(expired.status().is_client_error(), "{}", expired.status());
    let body = expired.text().await?;
    // AWS says "expired", Garage "Date is too old".
    assert!(
        body.to_lowercase().contains("expir") || body.contains("too old"),
        "{body}"
    );

    assert_eq!(s.list("projects/lab/").await?.len(), 1);
    assert_eq!(s.usage("projects/").await?, 5);
    Ok(())
}

#[tokio::test]
async fn a_store_that_is_not_there_is_an_error_not_a_hang() -> Result<()> {
    let mut g = Garage::start().await?;
    let s = storage(&g, Duration::from_secs(60))?;
    g.stop().await?;
    let e = tokio::time::timeout(Duration::from_secs(60), s.check())
        .await?
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("object storage"), "{e}");
    Ok(())
}

#[tokio::test]
async fn urls_name_the_public_address_and_work_through_a_proxy_there() -> Result<()> {
    let g = Garage::start().await?;
    // The public entry: another address, forwarding to the store.
    let proxy = ud_testkit::Proxy::start(None, &[("/", g.port)]).await?;
    let mut settings = StorageSettings::path_style(
        &g.endpoint,
        &g.region,
        &g.bucket,
        &g.access_key_id,
        &g.secret_access_key,
    );
    settings.public_endpoint = Some(proxy.url());
    let s = Storage::new(settings)?;
    // The platform itself still reaches the store directly.
    s.check().await?;
    let http = reqwest::Client::new();
    let key = "projects/lab/files/public.txt";

    let put = s.presign_put(key, 6, Duration::from_secs(60)).await?;
    assert!(put.url.starts_with(&proxy.url()), "{}", put.url);
    assert!(!put.url.contains(&g.endpoint));
    let sent = http.put(&put.url).body("hello!").send().await?;
    assert!(sent.status().is_success(), "{}", sent.text().await?);
    let head = s
        .head(key)
        .await?
        .ok_or_else(|| anyhow::anyhow!("not stored"))?;
    assert_eq!(head.size, 6);

    let get = s.presign_get(key, Duration::from_secs(60)).await?;
    assert!(get.url.starts_with(&proxy.url()), "{}", get.url);
    assert_eq!(http.get(&get.url).send().await?.text().await?, "hello!");

    // Multipart parts are signed for the public address too.
    let upload = s.start_multipart("projects/lab/files/parts.bin").await?;
    let part = s
        .presign_part(
            "projects/lab/files/parts.bin",
            &upload,
            1,
            Duration::from_secs(60),
        )
        .await?;
    assert!(part.url.starts_with(&proxy.url()), "{}", part.url);
    s.abort_multipart("projects/lab/files/parts.bin", &upload)
        .await?;
    Ok(())
}
