//! A Docker engine in a network namespace of its own, beside an "internet"
//! in another one (`scripts/isolated-docker.sh`): for tests of what task
//! containers may reach, without touching the machine's own network or
//! firewall. Needs root and iproute2, nsenter, iptables and busybox.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

pub struct IsolatedDocker {
    id: String,
    dir: PathBuf,
    /// `unix://...` of the engine.
    pub docker_host: String,
    /// A page on the "internet": reachable from an `egress` task only.
    pub internet: String,
    /// Services of the engine's host, on its loopback and its uplink: never
    /// reachable from a task.
    pub host_loopback: String,
    pub host_uplink: String,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/isolated-docker.sh")
}

impl IsolatedDocker {
    pub async fn start() -> Result<Self> {
        let id: String = format!("{:08x}", rand::random::<u32>());
        let dir = std::env::temp_dir().join(format!("ud-iso-{id}"));
        let out = tokio::process::Command::new("bash")
            .arg(script())
            .args(["up", &id])
            .arg(&dir)
            .output()
            .await
            .context("starting the isolated Docker engine")?;
        let mut engine = Self {
            id,
            dir,
            docker_host: String::new(),
            internet: String::new(),
            host_loopback: String::new(),
            host_uplink: String::new(),
        };
        // Dropped on failure: what was made is removed.
        if !out.status.success() {
            bail!(
                "the isolated Docker engine did not start: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let values: HashMap<String, String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let get = |k: &str| values.get(k).cloned().unwrap_or_default();
        engine.docker_host = get("DOCKER_HOST");
        engine.internet = get("INTERNET");
        engine.host_loopback = get("HOST_LOOPBACK");
        engine.host_uplink = get("HOST_UPLINK");
        Ok(engine)
    }
}

impl Drop for IsolatedDocker {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(script())
            .args(["down", &self.id])
            .arg(&self.dir)
            .output();
    }
}
