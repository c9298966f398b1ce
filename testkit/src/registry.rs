//! A container registry on a free loopback port: the Distribution registry
//! (`docker-registry`, Debian's package of `registry:2`), storing in a
//! temporary directory, without authentication. Docker engines pull from
//! `127.0.0.1:<port>` over plain HTTP, as they do from any loopback registry.
//!
//! * `UD_REGISTRY`: path of the registry binary (default: `docker-registry`).

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub struct Registry {
    child: tokio::process::Child,
    _dir: tempfile::TempDir,
    /// `127.0.0.1:<port>`, the prefix of the images it holds.
    pub host: String,
}

impl Registry {
    pub async fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let host = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n",
                dir.path().join("data").display()
            ),
        )?;
        let program = std::env::var("UD_REGISTRY").unwrap_or_else(|_| "docker-registry".into());
        let child = tokio::process::Command::new(&program)
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {program} (Debian package docker-registry)"))?;
        let mut me = Self {
            child,
            _dir: dir,
            host,
        };
        let url = format!("http://{}/v2/", me.host);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = reqwest::get(&url).await {
                if r.status().is_success() {
                    return Ok(me);
                }
            }
            if let Some(status) = me.child.try_wait()? {
                bail!("the registry ended at start: {status}");
            }
            if Instant::now() > deadline {
                bail!("the registry did not answer {url} within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Pushes the engine's `local` image as `<host>/<name>` and removes the
    /// engine's copy of that name, so that a run must pull it; returns the
    /// reference.
    pub async fn push(&self, docker: &bollard::Docker, local: &str, name: &str) -> Result<String> {
        use futures::StreamExt;
        let (repo, tag) = name.rsplit_once(':').unwrap_or((name, "latest"));
        let target = format!("{}/{repo}", self.host);
        docker
            .tag_image(
                local,
                Some(bollard::query_parameters::TagImageOptions {
                    repo: Some(target.clone()),
                    tag: Some(tag.to_owned()),
                }),
            )
            .await?;
        let mut push = docker.push_image(
            &target,
            Some(bollard::query_parameters::PushImageOptions {
                tag: Some(tag.to_owned()),
                ..Default::default()
            }),
            None,
        );
        while let Some(item) = push.next().await {
            if let Some(e) = item?.error_detail.and_then(|d| d.message) {
                bail!("pushing {target}:{tag}: {e}");
            }
        }
        let reference = format!("{target}:{tag}");
        docker
            .remove_image(
                &reference,
                None::<bollard::query_parameters::RemoveImageOptions>,
                None,
            )
            .await?;
        Ok(reference)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
