//! A whole main server in the test process, on real servers.
#![allow(dead_code)] // each test binary uses part of it

use anyhow::Result;
use serde_json::{json, Value};
use ud_schemas::streams;
use ud_server::{self as server, Running, ServerConfig};
use ud_testkit::{NatsServer, PgDatabase};

pub struct Stack {
    pub _nats: NatsServer,
    pub _pg: PgDatabase,
    pub server: Running,
    pub base: String,
    pub http: reqwest::Client,
    pub admin: String,
}

impl Stack {
    pub async fn start() -> Result<Self> {
        Self::start_with(None).await
    }

    pub async fn start_with(storage: Option<ud_storage::Storage>) -> Result<Self> {
        Self::start_full(storage, Default::default()).await
    }

    pub async fn start_full(
        storage: Option<ud_storage::Storage>,
        disk: ud_gateway::health::DiskWatch,
    ) -> Result<Self> {
        Self::start_on(NatsServer::start().await?, storage, disk).await
    }

    pub async fn start_on(
        nats: NatsServer,
        storage: Option<ud_storage::Storage>,
        disk: ud_gateway::health::DiskWatch,
    ) -> Result<Self> {
        Self::start_on_db(nats, PgDatabase::create().await?, storage, disk).await
    }

    pub async fn start_on_db(
        nats: NatsServer,
        pg: PgDatabase,
        storage: Option<ud_storage::Storage>,
        disk: ud_gateway::health::DiskWatch,
    ) -> Result<Self> {
        let cfg = ServerConfig {
            storage,
            disk,
            secrets: Some(ud_core::secrets::SecretKey::random().0),
            // The tests' webhook receivers listen on 127.0.0.1.
            webhooks: ud_notify::deliver::Settings {
                allow_private: true,
                ..Default::default()
            },
            ..ServerConfig::local(nats.url(), pg.url.clone())
        };
        Self::start_config(nats, pg, cfg).await
    }

    /// A stack whose services restart as `restarts` says.
    pub async fn start_restarting(restarts: server::Policy) -> Result<Self> {
        let (nats, pg) = (NatsServer::start().await?, PgDatabase::create().await?);
        let cfg = ServerConfig {
            restarts,
            ..ServerConfig::local(nats.url(), pg.url.clone())
        };
        Self::start_config(nats, pg, cfg).await
    }

    pub async fn start_config(nats: NatsServer, pg: PgDatabase, cfg: ServerConfig) -> Result<Self> {
        let server = server::start(cfg).await?;
        let issued = ud_core::commands::issue_token(
            server.state.commands.store(),
            &ud_core::commands::NewToken::scoped("admin", &[], true),
            "test",
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        assert!(
            server
                .state
                .projected
                .wait(
                    streams::AUTH,
                    issued.seq,
                    std::time::Duration::from_secs(10)
                )
                .await
        );
        let base = format!("http://{}", server.addr);
        Ok(Self {
            _nats: nats,
            _pg: pg,
            server,
            base,
            http: reqwest::Client::new(),
            admin: issued.secret,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// A token for these projects, issued through the API.
    pub async fn token(&self, projects: &[&str]) -> Result<String> {
        let v: Value = self
            .http
            .post(self.url("/api/v1/tokens"))
            .bearer_auth(&self.admin)
            .json(&json!({"name": format!("user-{}", projects.join("-")), "projects": projects}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(v["token"].as_str().unwrap_or_default().to_owned())
    }

    /// Runs a command against a task as a node would, then waits until the
    /// read model has it.
    pub async fn node_says(
        &self,
        id: ud_schemas::TaskId,
        command: ud_core::task::TaskCommand,
    ) -> Result<()> {
        let done = self
            .server
            .state
            .commands
            .execute(id, command, "node", |_| true)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        self.server
            .state
            .projected
            .wait(streams::TASKS, done.seq, std::time::Duration::from_secs(10))
            .await;
        Ok(())
    }

    pub async fn tasks_in_stream(&self) -> Result<u64> {
        Ok(self
            .server
            .state
            .commands
            .store()
            .jetstream()
            .get_stream(streams::TASKS)
            .await?
            .info()
            .await?
            .state
            .messages)
    }
}

pub fn task(project: &str) -> Value {
    json!({
        "project": project,
        "name": "train",
        "code_repo_url": "https://git.example.org/lab/code.git",
        "code_commit_id": "0123456789abcdef0123456789abcdef01234567",
        "env_repo_url": "https://git.example.org/lab/env.git",
        "env_commit_id": "89abcdef0123456789abcdef0123456789abcdef",
        "dockerfile_path": "envs/cpu/Dockerfile",
        "command": ["python", "train.py"],
        "args": ["--epochs", "1"],
        "env": {"SEED": "1"},
        "resources": {"cpus": 2, "memory_mb": 4096, "gpus": 1, "gpu_model": "A100", "labels": {"zone": "lab2"}},
        "timeout_seconds": 600,
        "retry": {"max_attempts": 2, "backoff_seconds": 5}
    })
}
