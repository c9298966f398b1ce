//! Versioned code and environments: a git cache of bare mirrors (only the
//! commits asked for are fetched), checkouts into task workspaces, and
//! environment images built from the env repository at its commit, named by
//! what defines them so that a second task with the same environment starts
//! without building.
//!
//! * [`git`]: the mirrors and checkouts;
//! * [`image`]: build contexts and image builds;
//! * [`cache`]: last use and eviction;
//! * here: preparing one task from the three.

mod cache;
mod git;
mod image;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bollard::Docker;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use ud_schemas::dispatch::GitCredentialsReply;
use ud_schemas::{TaskId, TaskSpec};

use crate::requests::Requests;

/// Why preparing a task failed, naming the step.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("fetching {what} from {url}: {reason}")]
    Fetch {
        what: &'static str,
        url: String,
        reason: String,
    },
    #[error("fetching {what} from {url}: {reason}")]
    Auth {
        what: &'static str,
        url: String,
        reason: String,
    },
    #[error("commit {commit} is not in {url}")]
    NoCommit { url: String, commit: String },
    #[error("dockerfile_path {0:?} is not a file inside the environment repository")]
    Dockerfile(String),
    #[error("building the environment image: {0}")]
    Build(String),
    #[error("pulling the image {image}: {reason}")]
    Pull { image: String, reason: String },
    #[error("preparing the workspace: {0}")]
    Io(String),
}

fn io(e: impl std::fmt::Display) -> PrepareError {
    PrepareError::Io(e.to_string())
}

fn digest(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())
}

/// The image an environment builds into: named by env repo, commit and Dockerfile path.
pub fn image_tag(spec: &TaskSpec) -> String {
    format!(
        "unidesk-env:{}",
        &digest(&[
            &spec.env_repo_url,
            &spec.env_commit_id,
            &spec.dockerfile_path
        ])[..24]
    )
}

/// A reference as Docker pulls it: without a tag or digest, `latest` (the
/// engine's API would otherwise pull every tag).
pub fn with_tag(image: &str) -> String {
    let name = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || name.contains(':') {
        image.to_owned()
    } else {
        format!("{image}:latest")
    }
}

/// Whether a URL is fetched over the network (and may need credentials).
fn remote(url: &str) -> bool {
    !url.starts_with("file://")
}

#[derive(Clone)]
pub struct Versions {
    root: PathBuf,
    docker: Docker,
    build_timeout: std::time::Duration,
    /// Above this, environment images and repository mirrors are evicted, least recently used first.
    cache_limit_bytes: u64,
    /// When each image and mirror was last used (ms since the epoch).
    last_used: Arc<Mutex<HashMap<String, i64>>>,
    /// One lock per repository mirror and per image: the same fetch or build
    /// asked for by two tasks at once happens once.
    locks: Locks,
    /// Images and mirrors that runs are preparing or using, with how many:
    /// never evicted.
    in_use: InUseMap,
    creds: Option<Requests>,
}

type InUseMap = Arc<std::sync::Mutex<HashMap<String, usize>>>;

/// What one run needs from the cache (its image and mirrors), kept from
/// eviction while this lives.
pub struct InUse {
    keys: Vec<String>,
    map: InUseMap,
}

impl InUse {
    fn take(map: &InUseMap, keys: Vec<String>) -> Self {
        if let Ok(mut m) = map.lock() {
            for k in &keys {
                *m.entry(k.clone()).or_default() += 1;
            }
        }
        Self {
            keys,
            map: map.clone(),
        }
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        if let Ok(mut m) = self.map.lock() {
            for k in &self.keys {
                if let Some(n) = m.get_mut(k) {
                    *n -= 1;
                    if *n == 0 {
                        m.remove(k);
                    }
                }
            }
        }
    }
}

/// One lock per key, gone from the map once no one holds or awaits it.
#[derive(Clone, Default)]
struct Locks(Arc<std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>>);

/// Holds the lock of one key.
struct KeyGuard {
    key: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    locks: Locks,
}

impl Locks {
    async fn lock(&self, key: String) -> KeyGuard {
        let lock = match self.0.lock() {
            Ok(mut map) => map.entry(key.clone()).or_default().clone(),
            // A poisoned map: this key's lock is new (and not shared).
            Err(_) => Arc::default(),
        };
        KeyGuard {
            guard: Some(lock.lock_owned().await),
            key,
            locks: self.clone(),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().map_or(0, |m| m.len())
    }
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        drop(self.guard.take());
        if let Ok(mut map) = self.locks.0.lock() {
            // Only the map's own reference left: no one holds or awaits it.
            if map
                .get(&self.key)
                .is_some_and(|l| Arc::strong_count(l) == 1)
            {
                map.remove(&self.key);
            }
        }
    }
}

/// What a prepared task runs: the image, and the code checked out for it.
pub struct Prepared {
    pub image: String,
    pub image_id: String,
    pub dockerfile_digest: String,
    pub workspace: PathBuf,
    /// Steps taken, in order, with their durations.
    pub steps: Vec<(&'static str, std::time::Duration)>,
    /// Keeps the image and mirrors from eviction until the run is over.
    pub in_use: InUse,
}

impl Versions {
    pub fn new(
        root: PathBuf,
        docker: Docker,
        build_timeout: std::time::Duration,
        cache_limit_bytes: u64,
    ) -> Self {
        Self {
            root,
            docker,
            build_timeout,
            cache_limit_bytes,
            last_used: Arc::default(),
            locks: Locks::default(),
            in_use: Arc::default(),
            creds: None,
        }
    }

    /// Fetches from repositories that need credentials ask `source` for them.
    pub fn with_credentials(mut self, source: Requests) -> Self {
        self.creds = Some(source);
        self
    }

    fn is_in_use(&self, key: &str) -> bool {
        self.in_use
            .lock()
            .map(|m| m.contains_key(key))
            .unwrap_or(true)
    }

    async fn lock(&self, key: String) -> KeyGuard {
        self.locks.lock(key).await
    }

    fn mirror_path(&self, url: &str) -> PathBuf {
        self.root
            .join("git")
            .join(format!("{}.git", &digest(&[url])[..32]))
    }

    /// Makes sure the mirror of `url` has `commit`, fetching only what is missing.
    async fn fetch(
        &self,
        task: TaskId,
        what: &'static str,
        url: &str,
        commit: &str,
    ) -> Result<PathBuf, PrepareError> {
        let path = self.mirror_path(url);
        let _guard = self.lock(path.display().to_string()).await;
        let (p, c) = (path.clone(), commit.to_owned());
        let cached = tokio::task::spawn_blocking(move || git::has_commit(&p, &c))
            .await
            .unwrap_or(false);
        if cached {
            return Ok(path);
        }
        // Credentials live in memory for this fetch only.
        let creds = match (&self.creds, remote(url)) {
            (Some(source), true) => match source.credentials(task, url).await {
                Ok(GitCredentialsReply::Denied { reason }) => {
                    return Err(PrepareError::Auth {
                        what,
                        url: url.to_owned(),
                        reason: format!("the platform refused credentials: {reason}"),
                    })
                }
                Ok(reply) => Some(reply),
                Err(e) => {
                    tracing::warn!(error = %e, "no repository credentials; fetching without");
                    None
                }
            },
            _ => None,
        };
        let (p, u, c) = (path.clone(), url.to_owned(), commit.to_owned());
        tokio::task::spawn_blocking(move || git::fetch_blocking(&p, &u, &c, creds.as_ref()))
            .await
            .map_err(|e| PrepareError::Io(e.to_string()))?
            .map_err(|e| match e {
                git::FetchError::Missing => PrepareError::NoCommit {
                    url: url.to_owned(),
                    commit: commit.to_owned(),
                },
                git::FetchError::Git(reason) => PrepareError::Fetch {
                    what,
                    url: url.to_owned(),
                    reason,
                },
                git::FetchError::Auth(reason) => PrepareError::Auth {
                    what,
                    url: url.to_owned(),
                    reason: reason.to_owned(),
                },
            })?;
        Ok(path)
    }

    /// Fetches code and environment, builds the image if it does not exist
    /// (or pulls the image the task names if it is not here), checks the
    /// code out into the task's workspace. `log` receives build
    /// output, `step` the name of each step as it begins.
    pub async fn prepare<F, Fut, S, SFut>(
        &self,
        task: TaskId,
        spec: &TaskSpec,
        workspace: &Path,
        log: F,
        step: S,
    ) -> Result<Prepared, PrepareError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = ()>,
        S: Fn(&'static str) -> SFut,
        SFut: std::future::Future<Output = ()>,
    {
        let mut steps = Vec::new();
        let image = match &spec.image {
            Some(named) => with_tag(named),
            None => image_tag(spec),
        };
        let mut keys = vec![
            image.clone(),
            self.mirror_path(&spec.code_repo_url).display().to_string(),
        ];
        if spec.image.is_none() {
            keys.push(self.mirror_path(&spec.env_repo_url).display().to_string());
        }
        // Kept from eviction from here until the run is over.
        let in_use = InUse::take(&self.in_use, keys);
        step("fetch_code").await;
        let t = std::time::Instant::now();
        let code = self
            .fetch(task, "code", &spec.code_repo_url, &spec.code_commit_id)
            .await?;
        steps.push(("fetch_code", t.elapsed()));
        for key in &in_use.keys {
            self.touch(key).await;
        }
        let env = if spec.image.is_some() {
            // An image the task names: pulled once, however many runs ask.
            let _guard = self.lock(image.clone()).await;
            if self.docker.inspect_image(&image).await.is_err() {
                step("pull_image").await;
                let t = std::time::Instant::now();
                match tokio::time::timeout(self.build_timeout, self.pull(&image, &log)).await {
                    Ok(r) => r?,
                    Err(_) => {
                        return Err(PrepareError::Pull {
                            image: image.clone(),
                            reason: format!(
                                "ran past its time limit of {} s",
                                self.build_timeout.as_secs()
                            ),
                        })
                    }
                }
                steps.push(("pull_image", t.elapsed()));
            }
            None
        } else {
            let _guard = self.lock(image.clone()).await;
            step("fetch_environment").await;
            let t = std::time::Instant::now();
            let env = self
                .fetch(task, "environment", &spec.env_repo_url, &spec.env_commit_id)
                .await?;
            steps.push(("fetch_environment", t.elapsed()));
            if self.docker.inspect_image(&image).await.is_err() {
                step("build_image").await;
                let t = std::time::Instant::now();
                let context = self.root.join("build").join(&digest(&[&image])[..16]);
                let (e, c, commit, path) = (
                    env.clone(),
                    context.clone(),
                    spec.env_commit_id.clone(),
                    spec.dockerfile_path.clone(),
                );
                let tar = tokio::task::spawn_blocking(move || {
                    image::build_context(&e, &commit, &c, &path)
                })
                .await
                .map_err(|e| PrepareError::Io(e.to_string()))??;
                // Dropping the build's connection stops it; its intermediate containers are removed.
                let result = match tokio::time::timeout(
                    self.build_timeout,
                    self.build(&image, &spec.dockerfile_path, tar, &log),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => Err(PrepareError::Build(format!(
                        "ran past its time limit of {} s",
                        self.build_timeout.as_secs()
                    ))),
                };
                let marker = self.built_marker(&image);
                let recorded = tokio::task::spawn_blocking(move || {
                    let _ = std::fs::remove_dir_all(&context);
                    result?;
                    if let Some(dir) = marker.parent() {
                        let _ = std::fs::create_dir_all(dir);
                    }
                    Ok(std::fs::write(&marker, b""))
                })
                .await
                .map_err(io)?;
                if let Err(e) = recorded? {
                    tracing::warn!(error = %e, image = %image, "cannot record the build; the image will not be evicted");
                }
                steps.push(("build_image", t.elapsed()));
            }
            Some(env)
        };
        step("checkout").await;
        let t = std::time::Instant::now();
        let (c, commit, dest) = (code, spec.code_commit_id.clone(), workspace.to_owned());
        tokio::task::spawn_blocking(move || git::checkout(&c, &commit, &dest))
            .await
            .map_err(|e| PrepareError::Io(e.to_string()))??;
        steps.push(("checkout", t.elapsed()));
        let dockerfile_digest = match env {
            Some(e) => {
                let (commit, path) = (spec.env_commit_id.clone(), spec.dockerfile_path.clone());
                tokio::task::spawn_blocking(move || git::blob_digest(&e, &commit, &path))
                    .await
                    .map_err(|e| PrepareError::Io(e.to_string()))??
            }
            None => String::new(),
        };
        let image_id = self
            .docker
            .inspect_image(&image)
            .await
            .ok()
            .and_then(|i| i.id)
            .unwrap_or_default();
        Ok(Prepared {
            image,
            image_id,
            dockerfile_digest,
            workspace: workspace.to_owned(),
            steps,
            in_use,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reference_without_tag_or_digest_means_latest() {
        assert_eq!(with_tag("busybox"), "busybox:latest");
        assert_eq!(with_tag("localhost:5000/x/y"), "localhost:5000/x/y:latest");
        assert_eq!(with_tag("localhost:5000/x/y:2"), "localhost:5000/x/y:2");
        let pinned = format!("nvcr.io/nvidia/pytorch@sha256:{}", "0".repeat(64));
        assert_eq!(with_tag(&pinned), pinned);
    }

    #[tokio::test]
    async fn a_keys_lock_is_forgotten_once_no_one_holds_or_awaits_it() {
        let locks = Locks::default();
        let first = locks.lock("a".into()).await;
        let waiter = tokio::spawn({
            let locks = locks.clone();
            async move {
                let _held = locks.lock("a".into()).await;
            }
        });
        tokio::task::yield_now().await;
        assert_eq!(locks.len(), 1);
        drop(first);
        let _ = waiter.await;
        assert_eq!(locks.len(), 0);
        let _b = locks.lock("b".into()).await;
        assert_eq!(locks.len(), 1);
    }
}
