//! A Kubernetes API server stand-in (`scripts/kube-api.py`: PyPI `kmock`
//! with what kube-rs needs added) on a free port, for tests of the agent's
//! Kubernetes runtime: no kube-apiserver can be installed from a package
//! registry. It keeps objects in memory and runs no kubelet, so a test sets
//! Pod status itself and puts their logs through `/_test/logs`.

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{bail, Context, Result};
use tokio::io::AsyncBufReadExt;

pub struct KubeApi {
    child: tokio::process::Child,
    /// `http://127.0.0.1:<port>`
    pub url: String,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/kube-api.py")
}

impl KubeApi {
    pub async fn start() -> Result<Self> {
        let mut child = tokio::process::Command::new("python3")
            .arg(script())
            .arg("0")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the Kubernetes API stand-in (python3 with kmock 0.8)")?;
        let out = child.stdout.take().context("no stdout")?;
        let mut lines = tokio::io::BufReader::new(out).lines();
        let ready = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line())
            .await
            .context("the Kubernetes API stand-in did not start within 30 s")??;
        let Some(url) = ready.as_deref().and_then(|l| l.strip_prefix("READY ")) else {
            bail!("the Kubernetes API stand-in did not start (is kmock 0.8 installed?): {ready:?}");
        };
        Ok(Self {
            url: url.to_owned(),
            child,
        })
    }

    /// Appends to a Pod's log.
    pub async fn log(&self, namespace: &str, pod: &str, text: &str) -> Result<()> {
        let c = reqwest::Client::new();
        c.post(format!("{}/_test/logs/{namespace}/{pod}", self.url))
            .body(text.to_owned())
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
