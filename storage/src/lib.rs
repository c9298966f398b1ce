//! UniDesk's object storage: one abstraction over any S3-compatible store
//! (Garage, MinIO, AWS S3 and others speak the same API). Nothing outside this
//! crate knows which provider is behind it. Bytes never pass through the
//! platform: callers get presigned URLs naming one object and one method,
//! valid for minutes.

pub mod keys;
pub mod stores;

pub use stores::{StoreInfo, Stores, StoresConfig};

use std::time::Duration;

use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// S3 allows at most this many parts in one upload.
pub const MAX_PARTS: u64 = 10_000;
/// Parts are at least this large (S3's minimum is 5 MiB).
pub const MIN_PART_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("path {path:?} {reason}")]
    Path { path: String, reason: String },
    #[error("object {0} does not exist")]
    NoSuchObject(String),
    #[error("object storage: {0}")]
    Backend(String),
    #[error("object storage settings: {0}")]
    Settings(String),
    #[error("{0}")]
    Quota(String),
    /// What was asked for cannot be put together (the reason says why).
    #[error("{0}")]
    Refused(String),
}

fn backend(e: impl std::error::Error) -> StorageError {
    // The SDK's Display is terse ("service error"); its source says what happened.
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    StorageError::Backend(text)
}

/// Where the store is and how to sign in. The same settings serve Garage,
/// MinIO and AWS: only `endpoint` and `path_style` differ.
#[derive(Clone, Debug)]
pub struct StorageSettings {
    /// `None` for AWS S3 itself; a URL such as `http://127.0.0.1:3900` otherwise.
    pub endpoint: Option<String>,
    /// The address presigned URLs name, for nodes and users elsewhere (the
    /// store behind a proxy of the public host, which keeps the `Host`
    /// header); `None`: `endpoint`.
    pub public_endpoint: Option<String>,
    pub region: String,
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Address buckets as `<endpoint>/<bucket>` (Garage, MinIO) rather than as a host name.
    pub path_style: bool,
    /// How long presigned URLs stay valid.
    pub url_ttl: Duration,
    /// Most bytes one project may keep (`None`: no limit).
    pub project_quota_bytes: Option<u64>,
}

impl StorageSettings {
    /// Settings for a store at `endpoint` addressed by path (Garage, MinIO),
    /// with URLs living 15 minutes and no project quota.
    pub fn path_style(
        endpoint: &str,
        region: &str,
        bucket: &str,
        access_key_id: &str,
        secret_access_key: &str,
    ) -> Self {
        Self {
            endpoint: Some(endpoint.to_owned()),
            public_endpoint: None,
            region: region.to_owned(),
            bucket: bucket.to_owned(),
            access_key_id: access_key_id.to_owned(),
            secret_access_key: secret_access_key.to_owned(),
            path_style: true,
            url_ttl: Duration::from_secs(900),
            project_quota_bytes: None,
        }
    }
}

/// A presigned request: the method, the URL, and headers the caller must send.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Presigned {
    pub method: String,
    pub url: String,
    /// Headers that were signed and must be sent as they are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
    /// Milliseconds since the epoch after which the URL no longer works.
    pub expires_at: i64,
}

/// An object as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    /// Last modified, ms since the epoch.
    pub modified: Option<i64>,
    pub etag: Option<String>,
}

/// A part of a multipart upload that the store has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PartInfo {
    pub number: u32,
    pub size: u64,
    pub etag: String,
}

/// The parts of an upload of `size` bytes that are stored whole (a part of
/// the wrong size, cut off by a dropped link, is sent again).
pub fn parts_done(stored: &[PartInfo], size: u64) -> Vec<u32> {
    let (part_size, parts) = part_plan(size);
    let last = size.saturating_sub(part_size * u64::from(parts.saturating_sub(1)));
    stored
        .iter()
        .filter(|p| {
            p.number >= 1
                && p.number <= parts
                && p.size == if p.number == parts { last } else { part_size }
        })
        .map(|p| p.number)
        .collect()
}

/// How to send one object: one PUT, or the parts still missing of a multipart upload.
#[derive(Clone, Debug)]
pub enum Plan {
    Single(Presigned),
    Multipart {
        upload_id: String,
        part_size: u64,
        /// URLs of the parts still to send: (number from 1, PUT).
        parts: Vec<(u32, Presigned)>,
        /// Parts the store already has whole.
        done: Vec<u32>,
    },
}

/// How a file of `size` bytes is cut into parts: (part size, number of parts).
pub fn part_plan(size: u64) -> (u64, u32) {
    let part = MIN_PART_BYTES.max(size.div_ceil(MAX_PARTS));
    let parts = size.div_ceil(part).max(1);
    (part, u32::try_from(parts).unwrap_or(u32::MAX))
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[derive(Clone)]
pub struct Storage {
    client: aws_sdk_s3::Client,
    /// Signs URLs for the public endpoint (the same client without one).
    presigner: aws_sdk_s3::Client,
    settings: StorageSettings,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("endpoint", &self.settings.endpoint)
            .field("bucket", &self.settings.bucket)
            .finish()
    }
}

impl Storage {
    pub fn new(settings: StorageSettings) -> Result<Self, StorageError> {
        if settings.bucket.is_empty() {
            return Err(StorageError::Settings("the bucket name is empty".into()));
        }
        if settings.url_ttl.is_zero() || settings.url_ttl > Duration::from_secs(7 * 24 * 3600) {
            return Err(StorageError::Settings(
                "presigned URLs must live between 1 s and 7 days".into(),
            ));
        }
        let creds = Credentials::new(
            &settings.access_key_id,
            &settings.secret_access_key,
            None,
            None,
            "unidesk",
        );
        let mut config = aws_sdk_s3::Config::builder()
            .region(Region::new(settings.region.clone()))
            .credentials_provider(creds)
            .force_path_style(settings.path_style)
            // Presigned PUTs must not carry a checksum of an empty body.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            // A store that hangs is an error within seconds, not a stuck request.
            .timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(60))
                    .build(),
            );
        let public = settings
            .public_endpoint
            .as_ref()
            .or(settings.endpoint.as_ref());
        let presigner = match public {
            Some(endpoint) => config.clone().endpoint_url(endpoint),
            None => config.clone(),
        };
        if let Some(endpoint) = &settings.endpoint {
            config = config.endpoint_url(endpoint);
        }
        Ok(Self {
            client: aws_sdk_s3::Client::from_conf(config.build()),
            presigner: aws_sdk_s3::Client::from_conf(presigner.build()),
            settings,
        })
    }

    pub fn settings(&self) -> &StorageSettings {
        &self.settings
    }

    /// The SDK client, for tools that move bytes themselves (benchmarks, archives).
    pub fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    fn presigning(&self, ttl: Duration) -> Result<(PresigningConfig, i64), StorageError> {
        let ttl = ttl.min(self.settings.url_ttl);
        let config = PresigningConfig::expires_in(ttl).map_err(backend)?;
        Ok((
            config,
            now_millis() + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
        ))
    }

    fn presigned(req: aws_sdk_s3::presigning::PresignedRequest, expires_at: i64) -> Presigned {
        Presigned {
            method: req.method().to_owned(),
            url: req.uri().to_owned(),
            headers: req
                .headers()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            expires_at,
        }
    }

    /// How long a URL for moving `bytes` stays valid: enough to move them at
    /// 1 MiB/s (at least 5 minutes), within the configured lifetime.
    pub fn ttl_for(&self, bytes: u64) -> Duration {
        Duration::from_secs(300 + bytes / (1024 * 1024)).min(self.settings.url_ttl)
    }

    /// Is the bucket there and may we use it?
    pub async fn check(&self) -> Result<(), StorageError> {
        self.client
            .head_bucket()
            .bucket(&self.settings.bucket)
            .send()
            .await
            .map_err(backend)?;
        Ok(())
    }

    /// A URL to read one object.
    pub async fn presign_get(&self, key: &str, ttl: Duration) -> Result<Presigned, StorageError> {
        let (config, expires_at) = self.presigning(ttl)?;
        let req = self
            .presigner
            .get_object()
            .bucket(&self.settings.bucket)
            .key(key)
            .presigned(config)
            .await
            .map_err(backend)?;
        Ok(Self::presigned(req, expires_at))
    }

    /// A URL to write one object of exactly `size` bytes.
    pub async fn presign_put(
        &self,
        key: &str,
        size: u64,
        ttl: Duration,
    ) -> Result<Presigned, StorageError> {
        let (config, expires_at) = self.presigning(ttl)?;
        let size =
            i64::try_from(size).map_err(|_| StorageError::Settings("object too large".into()))?;
        let req = self
            .presigner
            .put_object()
            .bucket(&self.settings.bucket)
            .key(key)
            .content_length(size)
            .presigned(config)
            .await
            .map_err(backend)?;
        Ok(Self::presigned(req, expires_at))
    }

    /// How to send `size` bytes to `key`: one PUT for a single part, else a
    /// multipart upload (resumed when `upload_id` names one: only the
    /// missing parts get URLs).
    pub async fn plan_upload(
        &self,
        key: &str,
        size: u64,
        upload_id: Option<&str>,
    ) -> Result<Plan, StorageError> {
        let (part_size, parts) = part_plan(size);
        let ttl = self.ttl_for(size);
        if parts <= 1 && upload_id.is_none() {
            return Ok(Plan::Single(self.presign_put(key, size, ttl).await?));
        }
        let (upload_id, done) = match upload_id {
            Some(id) => (id.to_owned(), parts_done(&self.parts(key, id).await?, size)),
            None => (self.start_multipart(key).await?, vec![]),
        };
        let mut urls = Vec::new();
        for number in (1..=parts).filter(|n| !done.contains(n)) {
            urls.push((
                number,
                self.presign_part(key, &upload_id, number, ttl).await?,
            ));
        }
        Ok(Plan::Multipart {
            upload_id,
            part_size,
            parts: urls,
            done,
        })
    }

    /// Starts a multipart upload; returns its id.
    pub async fn start_multipart(&self, key: &str) -> Result<String, StorageError> {
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.settings.bucket)
            .key(key)
            .send()
            .await
            .map_err(backend)?;
        out.upload_id
            .ok_or_else(|| StorageError::Backend("no upload id in the answer".into()))
    }

    /// A URL to write part `number` of an upload.
    pub async fn presign_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        ttl: Duration,
    ) -> Result<Presigned, StorageError> {
        let (config, expires_at) = self.presigning(ttl)?;
        let number = i32::try_from(number)
            .map_err(|_| StorageError::Settings("part number out of range".into()))?;
        let req = self
            .presigner
            .upload_part()
            .bucket(&self.settings.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .presigned(config)
            .await
            .map_err(backend)?;
        Ok(Self::presigned(req, expires_at))
    }

    /// The parts an upload already has, in order.
    pub async fn parts(&self, key: &str, upload_id: &str) -> Result<Vec<PartInfo>, StorageError> {
        let mut parts = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let out = self
                .client
                .list_parts()
                .bucket(&self.settings.bucket)
                .key(key)
                .upload_id(upload_id)
                .set_part_number_marker(marker.clone())
                .send()
                .await
                .map_err(|e| match e.as_service_error() {
                    Some(s) if s.meta().code() == Some("NoSuchUpload") => {
                        StorageError::NoSuchObject(format!("upload {upload_id} of {key}"))
                    }
                    _ => backend(e),
                })?;
            for p in out.parts() {
                parts.push(PartInfo {
                    number: u32::try_from(p.part_number.unwrap_or(0)).unwrap_or(0),
                    size: u64::try_from(p.size.unwrap_or(0)).unwrap_or(0),
                    etag: p.e_tag.clone().unwrap_or_default(),
                });
            }
            match (out.is_truncated, out.next_part_number_marker) {
                (Some(true), Some(next)) => marker = Some(next),
                _ => break,
            }
        }
        parts.sort_by_key(|p| p.number);
        Ok(parts)
    }

    /// Completes an upload from the parts the store has; returns the object's size.
    pub async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
    ) -> Result<u64, StorageError> {
        let parts = self.parts(key, upload_id).await?;
        if parts.is_empty() {
            return Err(StorageError::Backend(format!(
                "upload {upload_id} of {key} has no parts"
            )));
        }
        let done = CompletedMultipartUpload::builder()
            .set_parts(Some(
                parts
                    .iter()
                    .map(|p| {
                        CompletedPart::builder()
                            .part_number(i32::try_from(p.number).unwrap_or(0))
                            .e_tag(&p.etag)
                            .build()
                    })
                    .collect(),
            ))
            .build();
        self.client
            .complete_multipart_upload()
            .bucket(&self.settings.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(done)
            .send()
            .await
            .map_err(backend)?;
        Ok(parts.iter().map(|p| p.size).sum())
    }

    pub async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), StorageError> {
        self.client
            .abort_multipart_upload()
            .bucket(&self.settings.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map_err(backend)?;
        Ok(())
    }

    /// The object's size and tag, or `None` when there is no such object.
    pub async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        match self
            .client
            .head_object()
            .bucket(&self.settings.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(o) => Ok(Some(ObjectInfo {
                key: key.to_owned(),
                size: u64::try_from(o.content_length.unwrap_or(0)).unwrap_or(0),
                modified: o.last_modified.and_then(|t| t.to_millis().ok()),
                etag: o.e_tag,
            })),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
            Err(e) => Err(backend(e)),
        }
    }

    /// Every object below `prefix`, in key order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.settings.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(backend)?;
            for o in page.contents() {
                out.push(ObjectInfo {
                    key: o.key.clone().unwrap_or_default(),
                    size: u64::try_from(o.size.unwrap_or(0)).unwrap_or(0),
                    modified: o.last_modified.and_then(|t| t.to_millis().ok()),
                    etag: o.e_tag.clone(),
                });
            }
        }
        Ok(out)
    }

    /// Bytes kept below `prefix`.
    pub async fn usage(&self, prefix: &str) -> Result<u64, StorageError> {
        Ok(self.list(prefix).await?.iter().map(|o| o.size).sum())
    }

    /// Writes a small object in one request (archives, manifests).
    pub async fn put(
        &self,
        key: &str,
        bytes: Vec<u8>,
        content_type: &str,
    ) -> Result<(), StorageError> {
        self.client
            .put_object()
            .bucket(&self.settings.bucket)
            .key(key)
            .content_type(content_type)
            .body(bytes.into())
            .send()
            .await
            .map_err(backend)?;
        Ok(())
    }

    /// Writes a file's bytes as one object, streaming from disk.
    pub async fn put_file(
        &self,
        key: &str,
        path: &std::path::Path,
        content_type: &str,
    ) -> Result<(), StorageError> {
        let body = aws_sdk_s3::primitives::ByteStream::from_path(path)
            .await
            .map_err(backend)?;
        self.client
            .put_object()
            .bucket(&self.settings.bucket)
            .key(key)
            .content_type(content_type)
            .body(body)
            .send()
            .await
            .map_err(backend)?;
        Ok(())
    }

    /// Reads an object into a file, streaming to disk; the bytes written.
    pub async fn get_to_file(
        &self,
        key: &str,
        path: &std::path::Path,
    ) -> Result<u64, StorageError> {
        let out = self
            .client
            .get_object()
            .bucket(&self.settings.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| match e.as_service_error() {
                Some(s) if s.is_no_such_key() => StorageError::NoSuchObject(key.to_owned()),
                _ => backend(e),
            })?;
        let mut body = out.body.into_async_read();
        let mut file = tokio::fs::File::create(path).await.map_err(backend)?;
        let n = tokio::io::copy(&mut body, &mut file)
            .await
            .map_err(backend)?;
        file.sync_all().await.map_err(backend)?;
        Ok(n)
    }

    /// A small object's bytes (`None`: no such object).
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let out = match self
            .client
            .get_object()
            .bucket(&self.settings.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(None),
            Err(e) => return Err(backend(e)),
        };
        let bytes = out.body.collect().await.map_err(backend)?;
        Ok(Some(bytes.into_bytes().to_vec()))
    }

    pub async fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.client
            .delete_object()
            .bucket(&self.settings.bucket)
            .key(key)
            .send()
            .await
            .map_err(backend)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_file_within_s3_limits() {
        for size in [
            0u64,
            1,
            MIN_PART_BYTES,
            MIN_PART_BYTES + 1,
            1 << 30,
            5 << 40,
        ] {
            let (part, n) = part_plan(size);
            assert!(part >= MIN_PART_BYTES);
            assert!(u64::from(n) <= MAX_PARTS, "{size}");
            assert!(part * u64::from(n) >= size, "{size}");
            assert!(
                n == 1 || part * u64::from(n - 1) < size,
                "{size}: a part too many"
            );
        }
    }
}
