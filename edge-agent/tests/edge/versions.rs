//! Pinned versions: code and environments from git, image builds and their cache, private repositories.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::{json, Value};
use ud_edge_agent::AgentConfig;
use ud_schemas::edge;

use crate::common::*;

fn git(dir: &std::path::Path, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("git")
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.org",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .output()?;
    if !out.status.success() {
        bail!("git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

fn commit_all(dir: &std::path::Path, message: &str) -> Result<String> {
    git(dir, &["add", "-A"])?;
    git(dir, &["commit", "-q", "-m", message])?;
    git(dir, &["rev-parse", "HEAD"])
}

/// An env repository with environments `a`, `b`, `broken` and `slow` (and a
/// symlink out of it), a code repository with two commits, and a node that
/// builds environments, with room for one image in its cache.
struct Builder {
    _repos: tempfile::TempDir,
    _work: tempfile::TempDir,
    env_dir: std::path::PathBuf,
    code_dir: std::path::PathBuf,
    env_commit: String,
    v1: String,
    v2: String,
    s: Stack,
    token: ud_schemas::edge::NodeToken,
    _leaf: ud_testkit::NatsServer,
    agent: tokio::task::JoinHandle<()>,
}

impl Builder {
    async fn start() -> Result<Self> {
        let repos = tempfile::tempdir()?;
        let env_dir = repos.path().join("env");
        let code_dir = repos.path().join("code");
        for d in [&env_dir, &code_dir] {
            std::fs::create_dir_all(d)?;
            git(d, &["init", "-q"])?;
        }
        for (env, step) in [
            ("a", "RUN echo env-a > /env.txt"),
            ("broken", "RUN exit 7"),
            ("b", "RUN echo env-b > /env.txt"),
            ("slow", "RUN sleep 60"),
        ] {
            std::fs::create_dir_all(env_dir.join(format!("envs/{env}")))?;
            std::fs::write(
                env_dir.join(format!("envs/{env}/Dockerfile")),
                format!("FROM unidesk/busybox:base\n{step}\n"),
            )?;
        }
        std::os::unix::fs::symlink("/etc", env_dir.join("outside"))?;
        let env_commit = commit_all(&env_dir, "environments")?;
        std::fs::write(code_dir.join("run.sh"), "echo code-v1; cat /env.txt; pwd\n")?;
        let v1 = commit_all(&code_dir, "v1")?;
        std::fs::write(code_dir.join("run.sh"), "echo code-v2; cat /env.txt\n")?;
        let v2 = commit_all(&code_dir, "v2")?;

        let mut s = Stack::start(Duration::from_secs(60)).await?;
        let token = s.enroll("builder").await?;
        let leaf = s.leaf(&token, s.hub.leaf_port()).await?;
        let work = tempfile::tempdir()?;
        let agent = run_agent(AgentConfig {
            image: None,
            work_dir: work.path().to_owned(),
            build_timeout: Duration::from_secs(10),
            // Room for one environment: the next one evicts the least recently used.
            cache_limit_mb: 0,
            labels: BTreeMap::new(),
            ..agent_config(&leaf, &token, "builder", Duration::from_millis(500))
        });
        s.node_status(token.node_id, "online", JOIN).await?;
        Ok(Self {
            _repos: repos,
            _work: work,
            env_dir,
            code_dir,
            env_commit,
            v1,
            v2,
            s,
            token,
            _leaf: leaf,
            agent,
        })
    }

    fn url(d: &std::path::Path) -> String {
        format!("file://{}", d.display())
    }

    /// A task of code commit `code` in environment `dockerfile`.
    fn body(&self, code: &str, dockerfile: &str) -> Value {
        json!({
            "project": "lab", "code_repo_url": Self::url(&self.code_dir), "code_commit_id": code,
            "env_repo_url": Self::url(&self.env_dir), "env_commit_id": self.env_commit, "dockerfile_path": dockerfile,
            "command": ["sh", "run.sh"], "resources": {"cpus": 0.5, "memory_mb": 64}, "timeout_seconds": 120
        })
    }

    async fn run(&mut self, code: &str, dockerfile: &str) -> Result<(String, Value)> {
        let body = self.body(code, dockerfile);
        let id = self.s.submit_body(body).await?;
        let done = self
            .s
            .task_state(&id, &["succeeded", "failed"], Duration::from_secs(120))
            .await?;
        Ok((id, done))
    }

    /// The image an environment of the env repository builds into.
    fn image(&self, dockerfile: &str) -> Result<String> {
        let spec: ud_schemas::TaskSpec = serde_json::from_value(json!({
            "name": null, "code_repo_url": Self::url(&self.code_dir), "code_commit_id": self.v1,
            "env_repo_url": Self::url(&self.env_dir), "env_commit_id": self.env_commit,
            "dockerfile_path": dockerfile, "command": ["sh"], "args": [], "env": {},
            "resources": {"cpu_millis": 1, "memory_mb": 1, "gpus": 0, "gpu_model": null, "labels": {}},
            "timeout_seconds": 1, "retry": {"max_attempts": 1, "backoff_seconds": 0}
        }))?;
        Ok(ud_edge_agent::env::image_tag(&spec))
    }
}

impl Drop for Builder {
    fn drop(&mut self) {
        self.agent.abort();
    }
}

fn step_names(prepared: &Value) -> Vec<&str> {
    prepared["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str())
        .collect()
}

#[tokio::test]
async fn a_task_runs_pinned_code_in_an_environment_built_once() -> Result<()> {
    let mut b = Builder::start().await?;
    let (v1, v2) = (b.v1.clone(), b.v2.clone());
    // First run: fetch both repositories, build the environment, run the code.
    let (first, done) = b.run(&v1, "envs/a/Dockerfile").await?;
    let s = &b.s;
    assert_eq!(done["state"], "succeeded", "{done}");
    let out = logs(s, &first).await?;
    assert!(
        out.contains("code-v1") && out.contains("env-a") && out.contains("/workspace"),
        "{out:?}"
    );
    assert!(
        out.contains("Step 1/2"),
        "the build log is kept with the task: {out:?}"
    );
    // What the run really used.
    let ran = &done["prepared"];
    assert_eq!(ran["code_commit_id"], v1.as_str());
    assert_eq!(ran["env_commit_id"], b.env_commit.as_str());
    let dockerfile = std::fs::read(b.env_dir.join("envs/a/Dockerfile"))?;
    assert_eq!(ran["dockerfile_digest"], hex_sha256(&dockerfile));
    assert!(
        ran["image_id"]
            .as_str()
            .is_some_and(|i| i.starts_with("sha256:")),
        "{ran}"
    );
    let steps = step_names(ran);
    assert_eq!(
        steps,
        vec![
            "fetch_code",
            "fetch_environment",
            "build_image",
            "checkout",
            "start"
        ]
    );
    // Each step was an event as it began, so the task showed it while preparing.
    let history = s.get(&format!("/api/v1/tasks/{first}/events")).await?;
    let began: Vec<&str> = history
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["type"] == "task.preparing")
        .filter_map(|e| e["data"]["step"].as_str())
        .collect();
    assert_eq!(began, steps);
    assert!(done["preparing"].is_null(), "{done}");

    // Same environment, new commit of the code: no build, the new code.
    let (second, done) = b.run(&v2, "envs/a/Dockerfile").await?;
    let s = &b.s;
    assert_eq!(done["state"], "succeeded", "{done}");
    let out = logs(s, &second).await?;
    assert!(out.contains("code-v2") && out.contains("env-a"), "{out:?}");
    assert!(
        !out.contains("Step 1/2"),
        "the environment was built again: {out:?}"
    );
    assert_eq!(
        step_names(&done["prepared"]),
        vec!["fetch_code", "fetch_environment", "checkout", "start"]
    );
    assert_eq!(done["prepared"]["image_id"], ran_image_id(s, &first).await?);
    Ok(())
}

#[tokio::test]
async fn a_task_runs_in_the_image_it_names_pulled_once_from_its_registry() -> Result<()> {
    let registry = ud_testkit::Registry::start().await?;
    let docker = bollard::Docker::connect_with_local_defaults()?;
    let name = format!("lab/pulled:{}", uuid::Uuid::new_v4().simple());
    let image = registry.push(&docker, IMAGE, &name).await?;
    let mut b = Builder::start().await?;
    let body = |image: &str| {
        json!({
            "project": "lab", "code_repo_url": Builder::url(&b.code_dir), "code_commit_id": b.v1,
            "image": image, "command": ["sh", "run.sh"],
            "resources": {"cpus": 0.5, "memory_mb": 64}, "timeout_seconds": 120
        })
    };
    let (first, second, missing) = (
        body(&image),
        body(&image),
        body(&format!("{}/lab/missing:1", registry.host)),
    );
    let s = &mut b.s;
    let id = s.submit_body(first).await?;
    let done = s
        .task_state(&id, &["succeeded", "failed"], Duration::from_secs(120))
        .await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    let out = logs(s, &id).await?;
    assert!(
        out.contains("code-v1") && out.contains("/workspace"),
        "{out:?}"
    );
    assert!(
        out.contains("Downloaded newer image"),
        "the pull's progress is kept with the task: {out:?}"
    );
    let ran = &done["prepared"];
    assert_eq!(
        step_names(ran),
        vec!["fetch_code", "pull_image", "checkout", "start"]
    );
    assert_eq!(ran["dockerfile_digest"], "");
    let pulled = docker.inspect_image(&image).await?.id;
    assert_eq!(ran["image_id"].as_str(), pulled.as_deref());

    // The image is here now: the next run does not pull it again.
    let id = s.submit_body(second).await?;
    let done = s
        .task_state(&id, &["succeeded", "failed"], Duration::from_secs(120))
        .await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(
        step_names(&done["prepared"]),
        vec!["fetch_code", "checkout", "start"]
    );

    // An image the registry does not have fails the task, naming it.
    let id = s.submit_body(missing).await?;
    let done = s
        .task_state(&id, &["succeeded", "failed"], Duration::from_secs(120))
        .await?;
    assert_eq!(done["state"], "failed", "{done}");
    assert!(
        done["reason"]
            .as_str()
            .is_some_and(|r| r.contains("pulling the image") && r.contains("lab/missing:1")),
        "{done}"
    );
    let _ = docker
        .remove_image(
            &image,
            None::<bollard::query_parameters::RemoveImageOptions>,
            None,
        )
        .await;
    Ok(())
}

#[tokio::test]
async fn bad_versions_end_the_task_naming_the_step_and_the_node_stays_healthy() -> Result<()> {
    let mut b = Builder::start().await?;
    let cases = [
        (b.body(&"0".repeat(40), "envs/a/Dockerfile"), "is not in"),
        (b.body(&b.v1, "outside/passwd"), "dockerfile_path"),
        (b.body(&b.v1, "envs/missing/Dockerfile"), "dockerfile_path"),
        (
            b.body(&b.v1, "envs/broken/Dockerfile"),
            "building the environment image",
        ),
        (
            b.body(&b.v1, "envs/slow/Dockerfile"),
            "ran past its time limit of 10 s",
        ),
    ];
    let v1 = b.v1.clone();
    let s = &mut b.s;
    for (i, (body, reason)) in cases.into_iter().enumerate() {
        let id = s.submit_body(body).await?;
        if i == 4 {
            // A long build shows as the step under way.
            let shown = s
                .task_until(
                    &id,
                    "the build step to show",
                    Duration::from_secs(60),
                    |v| v["preparing"]["step"] == "build_image",
                )
                .await?;
            assert_eq!(shown["state"], "assigned", "{shown}");
            assert!(shown["preparing"]["since"].is_string(), "{shown}");
        }
        let done = s
            .task_state(&id, &["succeeded", "failed"], Duration::from_secs(120))
            .await?;
        assert_eq!(done["state"], "failed", "{done}");
        assert!(
            done["reason"].as_str().is_some_and(|r| r.contains(reason)),
            "expected {reason:?}: {done}"
        );
    }
    // The node stays healthy: a good task still runs.
    let (_, done) = b.run(&v1, "envs/a/Dockerfile").await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    Ok(())
}

#[tokio::test]
async fn environment_images_are_evicted_least_recently_used_and_only_this_agents() -> Result<()> {
    let mut b = Builder::start().await?;
    let v1 = b.v1.clone();
    let (_, done) = b.run(&v1, "envs/a/Dockerfile").await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    // An environment image of another node on the same Docker engine: not
    // this agent's to evict.
    let docker = bollard::Docker::connect_with_local_defaults()?;
    let foreign = format!("another-node-{}", b.token.node_id);
    docker
        .tag_image(
            "unidesk/busybox:base",
            Some(
                bollard::query_parameters::TagImageOptionsBuilder::new()
                    .repo("unidesk-env")
                    .tag(&foreign)
                    .build(),
            ),
        )
        .await?;
    // Another environment on a full cache: the least recently used image goes.
    let (other, done) = b.run(&v1, "envs/b/Dockerfile").await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(logs(&b.s, &other).await?.contains("env-b"));
    let foreign = format!("unidesk-env:{foreign}");
    let kept = docker.inspect_image(&foreign).await.is_ok();
    let _ = docker
        .remove_image(
            &foreign,
            None::<bollard::query_parameters::RemoveImageOptions>,
            None,
        )
        .await;
    assert!(kept, "{foreign}, another node's image, was evicted");
    let (a_tag, b_tag) = (b.image("envs/a/Dockerfile")?, b.image("envs/b/Dockerfile")?);
    assert!(
        docker.inspect_image(&a_tag).await.is_err(),
        "{a_tag} was not evicted"
    );
    assert!(
        docker.inspect_image(&b_tag).await.is_ok(),
        "{b_tag} was evicted while in use"
    );
    Ok(())
}

async fn stream_bytes(s: &Stack, stream: &str) -> Result<Vec<u8>> {
    let js = s.server.state.commands.store().jetstream().clone();
    let mut st = js.get_stream(stream).await?;
    let last = st.info().await?.state.last_sequence;
    let mut out = Vec::new();
    let mut seq = 1;
    while seq <= last {
        if let Ok(m) = st.get_raw_message(seq).await {
            out.extend_from_slice(&m.payload);
            out.extend_from_slice(format!("{:?}", m.headers).as_bytes());
        }
        seq += 1;
    }
    Ok(out)
}

#[tokio::test]
async fn private_repositories_are_fetched_with_credentials_the_platform_holds_and_never_shows(
) -> Result<()> {
    const TOKEN: &str = "tok-3f9a1c-kept-by-the-platform";
    let root = tempfile::tempdir()?;
    let src = root.path().join("src");
    std::fs::create_dir_all(&src)?;
    git(&src, &["init", "-q"])?;
    std::fs::write(
        src.join("Dockerfile"),
        "FROM unidesk/busybox:base\nRUN echo env-private > /env.txt\n",
    )?;
    std::fs::write(
        src.join("run.sh"),
        "env; cat /env.txt; echo private-code-ran\n",
    )?;
    let commit = commit_all(&src, "private")?;
    let served = root.path().join("served");
    std::fs::create_dir_all(&served)?;
    git(
        &served,
        &[
            "clone",
            "-q",
            "--bare",
            &src.display().to_string(),
            "private.git",
        ],
    )?;
    // Smart HTTP behind basic authentication: the right token, no entry, a wrong token.
    let good = ud_testkit::GitHttpServer::start(&served, Some(("ci", TOKEN))).await?;
    let unknown = ud_testkit::GitHttpServer::start(&served, Some(("ci", TOKEN))).await?;
    let wrong = ud_testkit::GitHttpServer::start(&served, Some(("ci", TOKEN))).await?;
    let file = json!({"hosts": {
        format!("127.0.0.1:{}", good.port()): {"username": "ci", "token": TOKEN, "allow_http": true},
        format!("127.0.0.1:{}", wrong.port()): {"username": "ci", "token": "not-the-token", "allow_http": true},
    }});
    let creds = ud_core::edge::credentials::GitCredentials::parse(
        &file.to_string(),
        std::path::Path::new("."),
    )?;
    let mut s = Stack::start_with(Duration::from_secs(60), creds, Default::default()).await?;
    let token = s.enroll("private").await?;
    let leaf = s.leaf(&token, s.hub.leaf_port()).await?;
    let work = tempfile::tempdir()?;
    let agent = run_agent(AgentConfig {
        image: None,
        work_dir: work.path().to_owned(),
        labels: BTreeMap::new(),
        ..agent_config(&leaf, &token, "private", Duration::from_millis(500))
    });
    s.node_status(token.node_id, "online", JOIN).await?;
    let submit = |url: String| {
        json!({
            "project": "lab", "code_repo_url": url, "code_commit_id": commit, "env_repo_url": url, "env_commit_id": commit,
            "dockerfile_path": "Dockerfile", "command": ["sh", "run.sh"],
            "resources": {"cpus": 0.5, "memory_mb": 64}, "timeout_seconds": 120
        })
    };

    let id = s.submit_body(submit(good.url("private.git"))).await?;
    let done = s
        .task_state(&id, &["succeeded", "failed"], Duration::from_secs(120))
        .await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    let out = logs(&s, &id).await?;
    assert!(
        out.contains("private-code-ran") && out.contains("env-private"),
        "{out:?}"
    );
    assert!(
        good.refused() >= 1 && good.served() >= 2,
        "the server asked for credentials and was given them"
    );
    // Never in the task's environment (printed by `env` above), its log, its events or any stream.
    assert!(!out.contains(TOKEN), "the token reached the task: {out}");
    let events = s.get(&format!("/api/v1/tasks/{id}/events")).await?;
    assert!(!events.to_string().contains(TOKEN));
    for stream in [
        ud_schemas::streams::TASKS,
        ud_schemas::streams::LOGS,
        edge::EDGE_IN,
        edge::DISPATCH,
    ] {
        let bytes = stream_bytes(&s, stream).await?;
        assert!(!bytes.is_empty(), "{stream} is empty");
        assert!(
            !bytes.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()),
            "the token is stored in {stream}"
        );
    }

    // No credentials for the host, or the wrong ones: the task fails and says why.
    for (server, reason) in [
        (&unknown, "the platform holds none"),
        (&wrong, "refused the credentials"),
    ] {
        let id = s.submit_body(submit(server.url("private.git"))).await?;
        let done = s
            .task_state(&id, &["succeeded", "failed"], Duration::from_secs(120))
            .await?;
        assert_eq!(done["state"], "failed", "{done}");
        assert!(
            done["reason"]
                .as_str()
                .is_some_and(|r| r.contains(reason) && r.contains("fetching code")),
            "expected {reason:?}: {done}"
        );
        assert_eq!(server.served(), 0);
    }
    // The node stays healthy and cached: the first repository runs again without a fetch.
    let again = s.submit_body(submit(good.url("private.git"))).await?;
    let before = good.served();
    let done = s
        .task_state(&again, &["succeeded", "failed"], Duration::from_secs(120))
        .await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(good.served(), before, "a cached commit was fetched again");
    agent.abort();
    Ok(())
}

fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

async fn ran_image_id(s: &Stack, task: &str) -> Result<Value> {
    Ok(s.get(&format!("/api/v1/tasks/{task}")).await?["prepared"]["image_id"].clone())
}
