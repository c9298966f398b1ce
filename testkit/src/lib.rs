//! Real servers for tests and benchmarks: a `nats-server` with JetStream on
//! a free loopback port (killed, store deleted, on drop) and a fresh
//! PostgreSQL database per test.
//!
//! * `UD_NATS_SERVER`: path of the nats-server binary (default: `nats-server` on PATH).
//! * `UD_TEST_DATABASE_URL`: a PostgreSQL URL with the right to create
//!   databases (`scripts/test.sh` starts a throw-away cluster and sets it).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How a test nats-server is configured.
#[derive(Clone, Debug)]
pub struct NatsOptions {
    /// `sync_interval: always`: fsync every write (the hub's production setting).
    pub sync_always: bool,
    /// Extra configuration text appended to the generated file.
    pub extra: String,
}

impl Default for NatsOptions {
    fn default() -> Self {
        Self { sync_always: true, extra: String::new() }
    }
}

/// A running nats-server with JetStream (domain `hub`).
pub struct NatsServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    options: NatsOptions,
    port: u16,
}

fn nats_binary() -> PathBuf {
    std::env::var_os("UD_NATS_SERVER").map_or_else(|| PathBuf::from("nats-server"), PathBuf::from)
}

impl NatsServer {
    pub async fn start() -> Result<Self> {
        Self::start_with(NatsOptions::default()).await
    }

    pub async fn start_with(options: NatsOptions) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut server = Self { child: None, dir, options, port: 0 };
        server.spawn().await?;
        Ok(server)
    }

    fn config(&self) -> String {
        let store = self.dir.path().join("js");
        let sync = if self.options.sync_always { "sync_interval: always" } else { "" };
        let port = if self.port == 0 { "-1".to_owned() } else { self.port.to_string() };
        format!(
            "host: 127.0.0.1\nport: {port}\nmax_payload: 8MB\njetstream {{\n  store_dir: {store:?}\n  domain: hub\n  {sync}\n}}\n{}\n",
            self.options.extra
        )
    }

    async fn spawn(&mut self) -> Result<()> {
        let conf = self.dir.path().join("nats.conf");
        std::fs::write(&conf, self.config())?;
        let mut child = Command::new(nats_binary())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {:?} (set UD_NATS_SERVER)", nats_binary()))?;
        let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
        let mut lines = BufReader::new(stderr).lines();
        let wait_ready = async {
            let mut port = None;
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                    port = rest.rsplit(':').next().and_then(|p| p.trim().parse::<u16>().ok());
                }
                if line.contains("Server is ready") {
                    return port.ok_or_else(|| anyhow!("server ready but no port seen"));
                }
                if line.contains("[FTL]") || line.contains("[ERR]") {
                    bail!("nats-server: {line}");
                }
            }
            bail!("nats-server exited before it was ready")
        };
        let port = tokio::time::timeout(Duration::from_secs(20), wait_ready).await??;
        // Keep draining the log so the server never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.port = port;
        self.child = Some(child);
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub async fn connect(&self) -> Result<async_nats::Client> {
        Ok(async_nats::connect(self.url()).await?)
    }

    /// Kills the server at once (SIGKILL), keeping its store.
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().await?;
        }
        Ok(())
    }

    /// Starts the server again on the same port and store.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill().await?;
        self.spawn().await
    }
}

/// A fresh, empty PostgreSQL database.
pub struct PgDatabase {
    pub name: String,
    pub url: String,
}

fn admin_url() -> Result<String> {
    std::env::var("UD_TEST_DATABASE_URL")
        .map_err(|_| anyhow!("UD_TEST_DATABASE_URL is not set: run the tests with scripts/test.sh"))
}

fn with_database(url: &str, db: &str) -> String {
    match url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{db}"),
        None => format!("{url}/{db}"),
    }
}

impl PgDatabase {
    pub async fn create() -> Result<Self> {
        let admin = admin_url()?;
        let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
            .await
            .with_context(|| format!("cannot connect to {admin}"))?;
        tokio::spawn(conn);
        let name = format!("t_{}", uuid::Uuid::now_v7().simple());
        client.batch_execute(&format!("CREATE DATABASE {name}")).await?;
        let url = with_database(&admin, &name);
        Ok(Self { name, url })
    }

    pub async fn connect(&self) -> Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }
}
