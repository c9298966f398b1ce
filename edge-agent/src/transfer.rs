//! A task's files, moved with presigned URLs the main server hands out for
//! that task only: inputs into the workspace before the run, outputs from it
//! to the object store after the run. Bytes stream between disk and network
//! (nothing holds a whole file in memory); transfers retry with backoff and
//! resume (downloads from the bytes already written, multipart uploads from
//! the parts the store already has).

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use reqwest::header::{CONTENT_LENGTH, RANGE};
use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use ud_schemas::dispatch::{OutputFile, StorageReply, StorageRequest, Upload};
use ud_schemas::events::OutputObject;
use ud_schemas::TaskId;

use crate::requests::Requests;

/// Tries per request before giving up.
const TRIES: u32 = 6;
/// Parts of one file sent at once.
const PARALLEL_PARTS: usize = 4;
/// Files sent at once.
const PARALLEL_FILES: usize = 4;
/// Read buffer for streaming a file into a request.
const CHUNK: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{0}")]
    Refused(String),
    #[error("output {0:?} was not produced by the run")]
    Missing(String),
    #[error("output {path:?}: {reason}")]
    Output { path: String, reason: String },
    #[error("input {object:?}: {reason}")]
    Input { object: String, reason: String },
    #[error("the main server did not answer: {0}")]
    Requests(String),
}

/// The waits between tries: from 0.2 s, doubling with jitter, at most 10 s.
fn waits() -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Whether an HTTP failure may succeed when tried again.
fn transient(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
}

fn http_reason(status: StatusCode) -> String {
    match status {
        StatusCode::FORBIDDEN => {
            "the object store refused the URL (expired or not for this object)".into()
        }
        StatusCode::NOT_FOUND => "no such object in the object store".into(),
        s => format!("the object store answered {s}"),
    }
}

/// Moves bytes between files and presigned URLs.
#[derive(Clone)]
pub struct Mover {
    http: reqwest::Client,
}

impl Default for Mover {
    fn default() -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // A stalled read or write fails the request; it is then tried again.
            .read_timeout(Duration::from_secs(60))
            .build()
            .unwrap_or_default();
        Self { http }
    }
}

/// A task's files: URLs from the main server, bytes moved by a [`Mover`].
#[derive(Clone)]
pub struct Transfers {
    mover: Mover,
    hub: Requests,
}

impl Transfers {
    pub fn new(hub: Requests) -> Self {
        Self {
            mover: Mover::default(),
            hub,
        }
    }

    pub(crate) fn mover(&self) -> &Mover {
        &self.mover
    }

    pub(crate) async fn ask(&self, req: StorageRequest) -> Result<StorageReply, TransferError> {
        match self
            .hub
            .storage(&req)
            .await
            .map_err(TransferError::Requests)?
        {
            StorageReply::Refused { reason } => Err(TransferError::Refused(reason)),
            reply => Ok(reply),
        }
    }

    /// Copies the task's inputs into `workspace`; returns the bytes copied.
    pub async fn inputs(
        &self,
        task: TaskId,
        attempt: u32,
        workspace: &Path,
    ) -> Result<u64, TransferError> {
        let req = StorageRequest::Inputs {
            task_id: task,
            attempt,
        };
        self.fetch(req, workspace).await
    }

    /// Downloads into `workspace` the files the answer to `req` names.
    async fn fetch(&self, req: StorageRequest, workspace: &Path) -> Result<u64, TransferError> {
        let StorageReply::Inputs { files } = self.ask(req).await? else {
            return Err(TransferError::Refused(
                "unexpected answer to a request for files".into(),
            ));
        };
        self.download_all(workspace, files).await
    }

    /// Uploads the files at `declared` paths in `workspace` (directories:
    /// everything below them) and records them as the task's outputs. When
    /// `required`, a declared path the run did not produce is an error.
    pub async fn outputs(
        &self,
        task: TaskId,
        attempt: u32,
        workspace: &Path,
        declared: &[String],
        required: bool,
    ) -> Result<Vec<OutputObject>, TransferError> {
        let (root, declared_owned) = (workspace.to_owned(), declared.to_vec());
        let found = tokio::task::spawn_blocking(move || {
            walk(&root, &declared_owned, required).and_then(hash_all)
        })
        .await
        .map_err(|e| TransferError::Refused(e.to_string()))??;
        if found.is_empty() {
            return Ok(vec![]);
        }
        self.send(
            &found,
            |files| StorageRequest::Outputs {
                task_id: task,
                attempt,
                files,
            },
            |files| StorageRequest::Complete {
                task_id: task,
                attempt,
                files,
            },
        )
        .await
    }

    /// Puts the task's last checkpoint into `workspace` (nothing when there
    /// is none yet); returns the bytes copied.
    pub async fn restore_checkpoint(
        &self,
        task: TaskId,
        attempt: u32,
        workspace: &Path,
    ) -> Result<u64, TransferError> {
        let req = StorageRequest::CheckpointRestore {
            task_id: task,
            attempt,
        };
        self.fetch(req, workspace).await
    }

    /// Uploads what changed in the checkpoint `folder` of `workspace` since
    /// `sent` (what was uploaded before: path -> size and modification
    /// time) and drops from the store what the folder no longer holds;
    /// returns the files uploaded.
    pub async fn save_checkpoint(
        &self,
        task: TaskId,
        attempt: u32,
        workspace: &Path,
        folder: &str,
        sent: &mut Sent,
    ) -> Result<usize, TransferError> {
        let (root, folder_owned, before) = (workspace.to_owned(), folder.to_owned(), sent.clone());
        let (changed, now) = tokio::task::spawn_blocking(move || {
            let found = walk(&root, &[folder_owned], false)?;
            let now: Sent = found
                .iter()
                .map(|f| (f.rel.clone(), (f.size, f.modified)))
                .collect();
            let changed: Vec<Found> = found
                .into_iter()
                .filter(|f| before.get(&f.rel) != Some(&(f.size, f.modified)))
                .collect();
            Ok::<_, TransferError>((hash_all(changed)?, now))
        })
        .await
        .map_err(|e| TransferError::Refused(e.to_string()))??;
        if changed.is_empty() && now.keys().eq(sent.keys()) {
            return Ok(0);
        }
        let present: Vec<String> = now.keys().cloned().collect();
        self.send(
            &changed,
            |files| StorageRequest::CheckpointSave {
                task_id: task,
                attempt,
                files,
            },
            |files| StorageRequest::CheckpointComplete {
                task_id: task,
                attempt,
                files,
                present: present.clone(),
            },
        )
        .await?;
        *sent = now;
        Ok(changed.len())
    }

    /// Downloads `files` into `workspace`; returns the bytes copied.
    async fn download_all(
        &self,
        workspace: &Path,
        files: Vec<ud_schemas::dispatch::InputUrl>,
    ) -> Result<u64, TransferError> {
        let mut total = 0;
        for f in files {
            let dest = inside(workspace, &f.path).map_err(|reason| TransferError::Input {
                object: f.object.clone(),
                reason,
            })?;
            self.mover
                .download(&f.url, &dest, f.size)
                .await
                .map_err(|reason| TransferError::Input {
                    object: f.object.clone(),
                    reason,
                })?;
            total += f.size;
        }
        Ok(total)
    }

    /// Uploads `found` with the URLs `urls` asks for (for some or all of
    /// them, by path), then completes them as `complete` asks.
    pub(crate) async fn send(
        &self,
        found: &[(OutputFile, PathBuf)],
        urls: impl Fn(Vec<OutputFile>) -> StorageRequest,
        complete: impl Fn(Vec<OutputFile>) -> StorageRequest,
    ) -> Result<Vec<OutputObject>, TransferError> {
        let mut files: Vec<OutputFile> = found.iter().map(|(f, _)| f.clone()).collect();
        // Rounds: a round that ran into expired URLs asks for fresh ones and resumes.
        for round in 0..3 {
            if files.is_empty() {
                break;
            }
            let StorageReply::Outputs { files: given } = self.ask(urls(files.clone())).await?
            else {
                return Err(TransferError::Refused(
                    "unexpected answer to an upload request".into(),
                ));
            };
            let mut uploads = Vec::with_capacity(given.len());
            for url in &given {
                let Some((file, local)) = found.iter().find(|(f, _)| f.path == url.path) else {
                    return Err(TransferError::Refused(format!(
                        "an upload URL for {:?}, which was not asked for",
                        url.path
                    )));
                };
                if let Upload::Multipart { upload_id, .. } = &url.upload {
                    if let Some(f) = files.iter_mut().find(|f| f.path == file.path) {
                        f.upload_id = Some(upload_id.clone());
                    }
                }
                uploads.push((
                    url.upload.clone(),
                    file.path.clone(),
                    local.clone(),
                    file.size,
                ));
            }
            // Several files at once (each in parts, some at once): a link
            // with latency is kept busy. The futures own what they use.
            let mover = self.mover.clone();
            let results: Vec<(String, Result<(), Put>)> = futures::stream::iter(uploads)
                .map(move |(upload, path, local, size)| {
                    let mover = mover.clone();
                    async move {
                        let r = mover.upload(&upload, &local, size).await;
                        (path, r)
                    }
                })
                .buffer_unordered(PARALLEL_FILES)
                .collect()
                .await;
            let mut expired = false;
            for (path, r) in results {
                match r {
                    Ok(()) => {}
                    Err(Put::Expired) if round < 2 => expired = true,
                    Err(e) => {
                        return Err(TransferError::Output {
                            path,
                            reason: e.to_string(),
                        })
                    }
                }
            }
            if !expired {
                break;
            }
        }
        let StorageReply::Complete { files: stored } = self.ask(complete(files)).await? else {
            return Err(TransferError::Refused(
                "unexpected answer to a complete request".into(),
            ));
        };
        Ok(stored)
    }
}

impl Mover {
    /// Downloads `url` into `dest` (exactly `size` bytes), resuming after a dropped link.
    pub async fn download(&self, url: &str, dest: &Path, size: u64) -> Result<(), String> {
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        let mut file = tokio::fs::File::create(dest)
            .await
            .map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
        let mut written = 0u64;
        let mut last = String::new();
        let mut waits = waits();
        for attempt in 0..TRIES {
            if attempt > 0 {
                tokio::time::sleep(waits.next().unwrap_or(Duration::from_secs(10))).await;
            }
            let mut req = self.http.get(url);
            if written > 0 {
                req = req.header(RANGE, format!("bytes={written}-"));
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            let status = resp.status();
            if !status.is_success() {
                last = http_reason(status);
                if transient(status) {
                    continue;
                }
                return Err(last);
            }
            if written > 0 && status != StatusCode::PARTIAL_CONTENT {
                // The store sent the whole object again: start over.
                file.set_len(0).await.map_err(|e| e.to_string())?;
                file.seek(std::io::SeekFrom::Start(0))
                    .await
                    .map_err(|e| e.to_string())?;
                written = 0;
            }
            let mut body = resp.bytes_stream();
            while let Some(chunk) = body.next().await {
                match chunk {
                    Ok(bytes) => {
                        file.write_all(&bytes)
                            .await
                            .map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
                        written += bytes.len() as u64;
                    }
                    Err(e) => {
                        last = format!("download cut off after {written} bytes: {e}");
                        break;
                    }
                }
            }
            if written == size {
                file.flush().await.map_err(|e| e.to_string())?;
                return Ok(());
            }
            if written > size {
                return Err(format!(
                    "the object store sent {written} bytes, more than the {size} expected"
                ));
            }
        }
        Err(format!("gave up after {TRIES} tries: {last}"))
    }

    /// Sends `local` (`size` bytes) as `upload` says: one PUT, or its missing parts.
    pub async fn upload(&self, upload: &Upload, local: &Path, size: u64) -> Result<(), Put> {
        match upload {
            Upload::Single { url } => self.put(url, local, 0, size).await,
            Upload::Multipart {
                part_size,
                part_urls,
                done,
                ..
            } => {
                self.put_parts(local, size, *part_size, part_urls, done)
                    .await
            }
        }
    }

    async fn put_parts(
        &self,
        local: &Path,
        size: u64,
        part_size: u64,
        urls: &[String],
        done: &[u32],
    ) -> Result<(), Put> {
        // Owned values only: the parts run as separate futures.
        let parts: Vec<(u64, String)> = urls
            .iter()
            .enumerate()
            .filter_map(|(i, url)| {
                let n = u32::try_from(i + 1).ok()?;
                (!done.contains(&n)).then(|| (u64::from(n - 1) * part_size, url.clone()))
            })
            .collect();
        let uploads = parts.into_iter().map(|(offset, url)| {
            let (this, local) = (self.clone(), local.to_path_buf());
            async move {
                this.put(
                    &url,
                    &local,
                    offset,
                    part_size.min(size.saturating_sub(offset)),
                )
                .await
            }
        });
        futures::stream::iter(uploads)
            .buffer_unordered(PARALLEL_PARTS)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// PUTs `len` bytes of `local` from `offset`, streaming, with retries.
    async fn put(&self, url: &str, local: &Path, offset: u64, len: u64) -> Result<(), Put> {
        let mut last = String::new();
        let mut waits = waits();
        for attempt in 0..TRIES {
            if attempt > 0 {
                tokio::time::sleep(waits.next().unwrap_or(Duration::from_secs(10))).await;
            }
            let mut file = tokio::fs::File::open(local)
                .await
                .map_err(|e| Put::Failed(format!("cannot read {}: {e}", local.display())))?;
            file.seek(std::io::SeekFrom::Start(offset))
                .await
                .map_err(|e| Put::Failed(e.to_string()))?;
            let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
                tokio::io::AsyncReadExt::take(file, len),
                CHUNK,
            ));
            match self
                .http
                .put(url)
                .header(CONTENT_LENGTH, len)
                .body(body)
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => return Ok(()),
                // An expired URL: 403 from AWS, 400 "Date is too old" from Garage.
                Ok(r) if r.status() == StatusCode::FORBIDDEN => return Err(Put::Expired),
                Ok(r) if r.status() == StatusCode::BAD_REQUEST => {
                    let body = r.text().await.unwrap_or_default();
                    if body.contains("too old") || body.to_lowercase().contains("expired") {
                        return Err(Put::Expired);
                    }
                    return Err(Put::Failed(format!(
                        "the object store refused the request: {body}"
                    )));
                }
                Ok(r) if !transient(r.status()) => {
                    return Err(Put::Failed(http_reason(r.status())))
                }
                Ok(r) => last = http_reason(r.status()),
                Err(e) => last = e.to_string(),
            }
        }
        Err(Put::Failed(format!("gave up after {TRIES} tries: {last}")))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Put {
    #[error("the object store refused the URL (expired or not for this object)")]
    Expired,
    #[error("{0}")]
    Failed(String),
}

/// `rel` joined to `root`, refused if it would leave `root`.
pub fn inside(root: &Path, rel: &str) -> Result<PathBuf, String> {
    let rel = ud_schemas::spec::relative_path(rel).map_err(|r| format!("path {rel:?} {r}"))?;
    Ok(root.join(rel))
}

/// What was uploaded of a folder: path (relative to the workspace) -> size
/// and modification time.
pub type Sent = std::collections::BTreeMap<String, (u64, Option<std::time::SystemTime>)>;

/// A file found below a declared path.
struct Found {
    /// Relative to the workspace.
    rel: String,
    path: PathBuf,
    size: u64,
    modified: Option<std::time::SystemTime>,
}

/// The files below the declared paths, by path. Symbolic links are never
/// followed (they could point outside the workspace).
fn walk(root: &Path, declared: &[String], required: bool) -> Result<Vec<Found>, TransferError> {
    let mut out = Vec::new();
    for d in declared {
        let path = inside(root, d).map_err(|reason| TransferError::Output {
            path: d.clone(),
            reason,
        })?;
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(_) if required => return Err(TransferError::Missing(d.clone())),
            Err(_) => continue,
        };
        let mut stack = vec![(path, d.trim_end_matches('/').to_owned(), meta)];
        while let Some((path, rel, meta)) = stack.pop() {
            if meta.is_dir() {
                let entries = std::fs::read_dir(&path).map_err(|e| TransferError::Output {
                    path: rel.clone(),
                    reason: e.to_string(),
                })?;
                for entry in entries.flatten() {
                    let Ok(m) = entry.metadata() else { continue };
                    let name = entry.file_name().to_string_lossy().into_owned();
                    stack.push((entry.path(), format!("{rel}/{name}"), m));
                }
            } else if meta.is_file() {
                out.push(Found {
                    rel,
                    path,
                    size: meta.len(),
                    modified: meta.modified().ok(),
                });
            }
        }
    }
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    out.dedup_by(|a, b| a.rel == b.rel);
    Ok(out)
}

/// What the store is told of each file, and where it is.
fn hash_all(found: Vec<Found>) -> Result<Vec<(OutputFile, PathBuf)>, TransferError> {
    found
        .into_iter()
        .map(|f| {
            let (size, sha256) = hash(&f.path).map_err(|e| TransferError::Output {
                path: f.rel.clone(),
                reason: e.to_string(),
            })?;
            Ok((
                OutputFile {
                    path: f.rel,
                    size,
                    sha256,
                    upload_id: None,
                },
                f.path,
            ))
        })
        .collect()
}

/// Size and hex SHA-256 of a file, read in chunks.
pub fn hash(path: &Path) -> std::io::Result<(u64, String)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex::encode(hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(
        root: &Path,
        declared: &[String],
        required: bool,
    ) -> Result<Vec<(OutputFile, PathBuf)>, TransferError> {
        hash_all(walk(root, declared, required)?)
    }

    #[test]
    fn outputs_are_collected_without_leaving_the_workspace() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let root = dir.path();
        std::fs::create_dir_all(root.join("results/sub"))?;
        std::fs::write(root.join("results/a.txt"), b"alpha")?;
        std::fs::write(root.join("results/sub/b.txt"), b"beta")?;
        std::fs::write(root.join("model.bin"), b"m")?;
        std::os::unix::fs::symlink("/etc/passwd", root.join("results/link"))?;
        let found = collect(root, &["results".into(), "model.bin".into()], true)
            .map_err(std::io::Error::other)?;
        let paths: Vec<&str> = found.iter().map(|(f, _)| f.path.as_str()).collect();
        assert_eq!(
            paths,
            vec!["model.bin", "results/a.txt", "results/sub/b.txt"]
        );
        assert_eq!(found[1].0.size, 5);
        assert_eq!(found[1].0.sha256, hex::encode(Sha256::digest(b"alpha")));
        assert!(matches!(
            collect(root, &["nope".into()], true),
            Err(TransferError::Missing(_))
        ));
        assert!(collect(root, &["nope".into()], false)
            .map(|f| f.is_empty())
            .unwrap_or(false));
        assert!(inside(root, "../x").is_err());
        Ok(())
    }
}
