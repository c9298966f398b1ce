//! Versioned code and environments: a git cache of bare mirrors (only the
//! commits asked for are fetched), checkouts into task workspaces, and
//! environment images built from the env repository at its commit, named by
//! what defines them so that a second task with the same environment starts
//! without building.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bollard::query_parameters::BuildImageOptions;
use bollard::Docker;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use ud_schemas::dispatch::GitCredentialsReply;
use ud_schemas::{TaskId, TaskSpec};

use crate::hub::Hub;

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
    #[error("preparing the workspace: {0}")]
    Io(String),
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
    locks: Arc<Mutex<HashMap<String, Arc<Mutex<()>>>>>,
    /// Images and mirrors that runs are preparing or using, with how many:
    /// never evicted.
    in_use: InUseMap,
    creds: Option<Hub>,
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
            locks: Arc::default(),
            in_use: Arc::default(),
            creds: None,
        }
    }

    /// Fetches from repositories that need credentials ask `source` for them.
    pub fn with_credentials(mut self, source: Hub) -> Self {
        self.creds = Some(source);
        self
    }

    async fn touch(&self, key: &str) {
        self.last_used
            .lock()
            .await
            .insert(key.to_owned(), ud_schemas::now_millis());
    }

    /// Evicts this node's environment images and repository mirrors, least
    /// recently used first, until the cache fits its limit. What runs are
    /// preparing or using stays (and Docker refuses to remove an image a
    /// container uses); each removal takes the lock of what it removes.
    pub async fn evict(&self) {
        let mut items: Vec<(i64, String, u64, bool)> = Vec::new(); // (last used, key, bytes, is image)
        let used = self.last_used.lock().await.clone();
        let filters = HashMap::from([("reference".to_owned(), vec!["unidesk-env".to_owned()])]);
        let images = self
            .docker
            .list_images(Some(bollard::query_parameters::ListImagesOptions {
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .unwrap_or_default();
        for image in images {
            for tag in image
                .repo_tags
                .iter()
                .filter(|t| t.starts_with("unidesk-env:"))
                // Only what this agent built: another agent on the same
                // Docker engine keeps its own.
                .filter(|t| self.built_marker(t).exists())
            {
                items.push((
                    used.get(tag).copied().unwrap_or(0),
                    tag.clone(),
                    u64::try_from(image.size).unwrap_or(0),
                    true,
                ));
            }
        }
        if let Ok(dir) = std::fs::read_dir(self.root.join("git")) {
            for entry in dir.flatten() {
                let path = entry.path().display().to_string();
                let bytes = tokio::task::spawn_blocking({
                    let p = entry.path();
                    move || dir_size(&p)
                })
                .await
                .unwrap_or(0);
                items.push((used.get(&path).copied().unwrap_or(0), path, bytes, false));
            }
        }
        let mut total: u64 = items.iter().map(|i| i.2).sum();
        items.sort();
        for (_, key, bytes, is_image) in items {
            if total <= self.cache_limit_bytes {
                break;
            }
            let lock = self.lock(key.clone()).await;
            let _guard = lock.lock().await;
            if self.is_in_use(&key) {
                continue;
            }
            let removed = if is_image {
                let gone = self
                    .docker
                    .remove_image(
                        &key,
                        None::<bollard::query_parameters::RemoveImageOptions>,
                        None,
                    )
                    .await
                    .is_ok();
                if gone {
                    let _ = std::fs::remove_file(self.built_marker(&key));
                }
                gone
            } else {
                std::fs::remove_dir_all(&key).is_ok()
            };
            if removed {
                tracing::info!(item = %key, bytes, "evicted from the cache");
                total = total.saturating_sub(bytes);
                self.last_used.lock().await.remove(&key);
            }
        }
    }

    /// A file that says this agent built the image `tag` (kept across restarts).
    fn built_marker(&self, tag: &str) -> PathBuf {
        self.root.join("images").join(tag.replace(':', "_"))
    }

    fn is_in_use(&self, key: &str) -> bool {
        self.in_use
            .lock()
            .map(|m| m.contains_key(key))
            .unwrap_or(true)
    }

    async fn lock(&self, key: String) -> Arc<Mutex<()>> {
        self.locks.lock().await.entry(key).or_default().clone()
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
        let lock = self.lock(path.display().to_string()).await;
        let _guard = lock.lock().await;
        let (p, c) = (path.clone(), commit.to_owned());
        let cached = tokio::task::spawn_blocking(move || has_commit(&p, &c))
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
        tokio::task::spawn_blocking(move || fetch_blocking(&p, &u, &c, creds.as_ref()))
            .await
            .map_err(|e| PrepareError::Io(e.to_string()))?
            .map_err(|e| match e {
                FetchError::Missing => PrepareError::NoCommit {
                    url: url.to_owned(),
                    commit: commit.to_owned(),
                },
                FetchError::Git(reason) => PrepareError::Fetch {
                    what,
                    url: url.to_owned(),
                    reason,
                },
                FetchError::Auth(reason) => PrepareError::Auth {
                    what,
                    url: url.to_owned(),
                    reason: reason.to_owned(),
                },
            })?;
        Ok(path)
    }

    /// Fetches code and environment, builds the image if it does not exist,
    /// checks the code out into the task's workspace. `log` receives build
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
        let image = image_tag(spec);
        // Kept from eviction from here until the run is over.
        let in_use = InUse::take(
            &self.in_use,
            vec![
                image.clone(),
                self.mirror_path(&spec.code_repo_url).display().to_string(),
                self.mirror_path(&spec.env_repo_url).display().to_string(),
            ],
        );
        step("fetch_code").await;
        let t = std::time::Instant::now();
        let code = self
            .fetch(task, "code", &spec.code_repo_url, &spec.code_commit_id)
            .await?;
        steps.push(("fetch_code", t.elapsed()));
        for key in &in_use.keys {
            self.touch(key).await;
        }
        let image_lock = self.lock(image.clone()).await;
        let env = {
            let _guard = image_lock.lock().await;
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
                let tar =
                    tokio::task::spawn_blocking(move || build_context(&e, &commit, &c, &path))
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
                let _ = std::fs::remove_dir_all(&context);
                result?;
                let marker = self.built_marker(&image);
                if let Some(dir) = marker.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                if let Err(e) = std::fs::write(&marker, b"") {
                    tracing::warn!(error = %e, image = %image, "cannot record the build; the image will not be evicted");
                }
                steps.push(("build_image", t.elapsed()));
            }
            env
        };
        step("checkout").await;
        let t = std::time::Instant::now();
        let (c, commit, dest) = (code, spec.code_commit_id.clone(), workspace.to_owned());
        tokio::task::spawn_blocking(move || checkout(&c, &commit, &dest))
            .await
            .map_err(|e| PrepareError::Io(e.to_string()))??;
        steps.push(("checkout", t.elapsed()));
        let (e, commit, path) = (
            env,
            spec.env_commit_id.clone(),
            spec.dockerfile_path.clone(),
        );
        let dockerfile_digest =
            tokio::task::spawn_blocking(move || blob_digest(&e, &commit, &path))
                .await
                .map_err(|e| PrepareError::Io(e.to_string()))??;
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

    async fn build<F, Fut>(
        &self,
        image: &str,
        dockerfile: &str,
        tar: Vec<u8>,
        log: &F,
    ) -> Result<(), PrepareError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let options = BuildImageOptions {
            dockerfile: dockerfile.to_owned(),
            t: Some(image.to_owned()),
            rm: true,
            forcerm: true,
            ..Default::default()
        };
        let mut stream =
            self.docker
                .build_image(options, None, Some(bollard::body_full(tar.into())));
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(text) = info.stream {
                        log(text).await;
                    }
                    if let Some(err) = info.error_detail.and_then(|d| d.message) {
                        return Err(PrepareError::Build(err));
                    }
                }
                Err(e) => return Err(PrepareError::Build(e.to_string())),
            }
        }
        if self.docker.inspect_image(image).await.is_err() {
            return Err(PrepareError::Build("the build produced no image".into()));
        }
        Ok(())
    }
}

enum FetchError {
    Missing,
    Git(String),
    Auth(&'static str),
}

fn has_commit(path: &Path, commit: &str) -> bool {
    let Ok(oid) = git2::Oid::from_str(commit) else {
        return false;
    };
    git2::Repository::open_bare(path).is_ok_and(|r| r.find_commit(oid).is_ok())
}

/// What the server asked for and what it was given, to explain a refusal.
#[derive(Default)]
struct AuthAsked {
    /// Times the server asked: a second time means the first answer was refused.
    calls: u32,
    offered: bool,
}

impl AuthAsked {
    fn failed(&self) -> Option<&'static str> {
        match (self.calls, self.offered) {
            (0, _) => None,
            (_, false) => {
                Some("the repository needs credentials and the platform holds none for its host")
            }
            (1, true) => None,
            (_, true) => {
                Some("the repository refused the credentials the platform holds for its host")
            }
        }
    }
}

/// Callbacks that answer the server's credential challenge once with what
/// the platform handed over, and give up when it asks again (refused).
fn callbacks<'a>(
    creds: Option<&'a GitCredentialsReply>,
    state: &'a std::cell::RefCell<AuthAsked>,
) -> git2::RemoteCallbacks<'a> {
    let mut cb = git2::RemoteCallbacks::new();
    cb.credentials(move |_url, user_from_url, allowed| {
        let mut s = state.borrow_mut();
        s.calls += 1;
        if s.calls > 1 {
            return Err(git2::Error::from_str("credentials refused"));
        }
        let cred = match creds {
            Some(GitCredentialsReply::Token { username, token })
                if allowed.contains(git2::CredentialType::USER_PASS_PLAINTEXT) =>
            {
                git2::Cred::userpass_plaintext(username, token)
            }
            Some(GitCredentialsReply::Ssh {
                username,
                private_key,
                passphrase,
            }) if allowed.contains(git2::CredentialType::SSH_KEY) => {
                git2::Cred::ssh_key_from_memory(
                    user_from_url.unwrap_or(username),
                    None,
                    private_key,
                    passphrase.as_deref(),
                )
            }
            Some(GitCredentialsReply::Ssh { username, .. })
                if allowed.contains(git2::CredentialType::USERNAME) =>
            {
                git2::Cred::username(user_from_url.unwrap_or(username))
            }
            _ => return Err(git2::Error::from_str("no credentials")),
        };
        s.offered = cred.is_ok();
        cred
    });
    cb
}

fn fetch_blocking(
    path: &Path,
    url: &str,
    commit: &str,
    creds: Option<&GitCredentialsReply>,
) -> Result<(), FetchError> {
    let state = std::cell::RefCell::new(AuthAsked::default());
    let git = |e: git2::Error| match state.borrow().failed() {
        Some(reason) => FetchError::Auth(reason),
        None => FetchError::Git(e.message().to_owned()),
    };
    let oid = git2::Oid::from_str(commit).map_err(|_| FetchError::Missing)?;
    let repo = if path.exists() {
        git2::Repository::open_bare(path).map_err(git)?
    } else {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| FetchError::Git(e.to_string()))?;
        }
        git2::Repository::init_bare(path).map_err(git)?
    };
    // The caller has seen that the commit is missing (`has_commit`, under the mirror's lock).
    let mut remote = repo.remote_anonymous(url).map_err(git)?;
    let options = || {
        let mut o = git2::FetchOptions::new();
        o.remote_callbacks(callbacks(creds, &state));
        o
    };
    // Only the commit asked for, where the server allows it; else the branches and tags.
    let direct = remote.fetch(&[commit], Some(&mut options()), None);
    if let (Some(reason), Err(_)) = (state.borrow().failed(), &direct) {
        return Err(FetchError::Auth(reason));
    }
    if direct.is_err() || repo.find_commit(oid).is_err() {
        *state.borrow_mut() = AuthAsked::default();
        let all = remote.fetch(
            &["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"],
            Some(&mut options()),
            None,
        );
        if let (Err(e), Err(_)) = (all, direct) {
            return Err(git(e));
        }
    }
    repo.find_commit(oid)
        .map(|_| ())
        .map_err(|_| FetchError::Missing)
}

fn io(e: impl std::fmt::Display) -> PrepareError {
    PrepareError::Io(e.to_string())
}

/// Writes the tree of `commit` into `dest` (created fresh).
fn checkout(mirror: &Path, commit: &str, dest: &Path) -> Result<(), PrepareError> {
    let repo = git2::Repository::open_bare(mirror).map_err(io)?;
    let oid = git2::Oid::from_str(commit).map_err(io)?;
    let obj = repo.find_commit(oid).map_err(io)?.into_object();
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(io)?;
    }
    std::fs::create_dir_all(dest).map_err(io)?;
    let mut cb = git2::build::CheckoutBuilder::new();
    cb.target_dir(dest).force().recreate_missing(true);
    repo.checkout_tree(&obj, Some(&mut cb)).map_err(io)
}

/// The build context: the env repository at `commit`, as a tar, after checking
/// that the Dockerfile is a file inside it.
fn build_context(
    mirror: &Path,
    commit: &str,
    dir: &Path,
    dockerfile: &str,
) -> Result<Vec<u8>, PrepareError> {
    checkout(mirror, commit, dir)?;
    let root = dir.canonicalize().map_err(io)?;
    let file = root
        .join(dockerfile)
        .canonicalize()
        .map_err(|_| PrepareError::Dockerfile(dockerfile.to_owned()))?;
    if !file.starts_with(&root) || !file.is_file() {
        return Err(PrepareError::Dockerfile(dockerfile.to_owned()));
    }
    let mut tar = tar::Builder::new(Vec::new());
    tar.follow_symlinks(false);
    tar.append_dir_all(".", &root).map_err(io)?;
    tar.into_inner().map_err(io)
}

/// Hex SHA-256 of a file's bytes at a commit (the Dockerfile the image was built from).
fn blob_digest(mirror: &Path, commit: &str, path: &str) -> Result<String, PrepareError> {
    let repo = git2::Repository::open_bare(mirror).map_err(io)?;
    let tree = repo
        .find_commit(git2::Oid::from_str(commit).map_err(io)?)
        .map_err(io)?
        .tree()
        .map_err(io)?;
    let entry = tree
        .get_path(Path::new(path))
        .map_err(|_| PrepareError::Dockerfile(path.to_owned()))?;
    let blob = repo
        .find_blob(entry.id())
        .map_err(|_| PrepareError::Dockerfile(path.to_owned()))?;
    Ok(hex::encode(Sha256::digest(blob.content())))
}

fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
