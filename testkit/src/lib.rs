//! Real servers for tests and benchmarks: a `nats-server` with JetStream on
//! a free loopback port (killed, store deleted, on drop) and a fresh
//! PostgreSQL database per test, a git smart-HTTP server with authentication,
//! a Garage object store with its bucket and key.
//!
//! * `UD_NATS_SERVER`: path of the nats-server binary (default: `nats-server` on PATH).
//! * `UD_TEST_DATABASE_URL`: a PostgreSQL URL with the right to create
//!   databases (`scripts/test.sh` starts a throw-away cluster and sets it).

mod garage;
mod git_http;
mod isolated_docker;
mod kube_api;
mod proxy;
mod registry;
mod session_image;
mod tls;
pub use garage::Garage;
pub use git_http::GitHttpServer;
pub use isolated_docker::IsolatedDocker;
pub use kube_api::KubeApi;
pub use proxy::Proxy;
pub use registry::Registry;
pub use session_image::{session_image, session_server, SESSION_IMAGE};
pub use tls::{TestCa, TlsFiles};

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
    /// JetStream domain (`hub` unless set).
    pub domain: String,
    /// Listen for leaf nodes and serve monitoring (a hub).
    pub hub: bool,
    /// Initial content of `accounts.conf`, included by the configuration.
    pub accounts: Option<String>,
    /// JetStream's `max_file_store` (e.g. `"4MB"`): the disk it may use.
    pub max_file_store: Option<String>,
    /// TLS on the leaf-node port (hubs only).
    pub leaf_tls: Option<TlsFiles>,
    /// A WebSocket port without TLS for leaf links behind a proxy (hubs only).
    pub websocket: bool,
}

impl Default for NatsOptions {
    fn default() -> Self {
        Self {
            sync_always: true,
            extra: String::new(),
            domain: "hub".into(),
            hub: false,
            accounts: None,
            max_file_store: None,
            leaf_tls: None,
            websocket: false,
        }
    }
}

/// A running nats-server with JetStream (domain `hub`).
pub struct NatsServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    options: NatsOptions,
    port: u16,
    leaf_port: u16,
    http_port: u16,
    ws_port: u16,
    /// Woken whenever the server logs a line.
    logged: std::sync::Arc<tokio::sync::Notify>,
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
        if let Some(accounts) = &options.accounts {
            std::fs::write(dir.path().join("accounts.conf"), accounts)?;
        }
        let mut server = Self {
            child: None,
            dir,
            options,
            port: 0,
            leaf_port: 0,
            http_port: 0,
            ws_port: 0,
            logged: Default::default(),
        };
        server.spawn().await?;
        Ok(server)
    }

    fn config(&self) -> String {
        let store = self.dir.path().join("js");
        let sync = if self.options.sync_always {
            "sync_interval: always"
        } else {
            ""
        };
        let limit = self
            .options
            .max_file_store
            .as_ref()
            .map(|max| format!("\n  max_file_store: {max}"))
            .unwrap_or_default();
        let port = |p: u16| {
            if p == 0 {
                "-1".to_owned()
            } else {
                p.to_string()
            }
        };
        let mut text = format!(
            "host: 127.0.0.1\nport: {}\nmax_payload: 8MB\npid_file: {:?}\njetstream {{\n  store_dir: {store:?}\n  domain: {}\n  {sync}{limit}\n  limits {{ batch {{ max_inflight_per_stream: 1000 }} }}\n}}\n",
            port(self.port),
            self.pid_file(),
            self.options.domain
        );
        if self.options.hub {
            let tls = self
                .options
                .leaf_tls
                .as_ref()
                .map(|t| {
                    format!(
                        "  tls {{\n    cert_file: {:?}\n    key_file: {:?}\n    timeout: 5\n  }}\n",
                        t.cert_file, t.key_file
                    )
                })
                .unwrap_or_default();
            text.push_str(&format!(
                "http: \"127.0.0.1:{}\"\nleafnodes {{\n  host: 127.0.0.1\n  port: {}\n  no_advertise: true\n{tls}}}\n",
                port(self.http_port),
                port(self.leaf_port)
            ));
            if self.options.websocket {
                text.push_str(&format!(
                    "websocket {{\n  host: 127.0.0.1\n  port: {}\n  no_tls: true\n}}\n",
                    port(self.ws_port)
                ));
            }
        }
        if self.options.accounts.is_some() {
            text.push_str("include \"accounts.conf\"\n");
        }
        if std::env::var_os("UD_TEST_NATS_DEBUG").is_some() {
            text.push_str("debug: true\n");
        }
        text.push_str(&self.options.extra);
        text.push('\n');
        text
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The file holding this server's PID (for reloads with SIGHUP).
    pub fn pid_file(&self) -> PathBuf {
        self.dir.path().join("nats.pid")
    }

    /// The accounts file the configuration includes.
    pub fn accounts_file(&self) -> PathBuf {
        self.dir.path().join("accounts.conf")
    }

    pub fn leaf_port(&self) -> u16 {
        self.leaf_port
    }

    /// The WebSocket port (hubs started with `websocket`).
    pub fn ws_port(&self) -> u16 {
        self.ws_port
    }

    /// What the server has logged since it was ready.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    /// Waits until the server has logged a line holding `needle`.
    pub async fn until_logged(&self, needle: &str, timeout: Duration) -> Result<()> {
        let wait = async {
            loop {
                let next = self.logged.notified();
                tokio::pin!(next);
                // Registered before looking, so that no line is missed between.
                next.as_mut().enable();
                if self.log().contains(needle) {
                    return;
                }
                next.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.map_err(|_| {
            anyhow!(
                "nats-server never logged {needle:?} within {timeout:?}:\n{}",
                self.log()
            )
        })
    }

    /// Base URL of the monitoring endpoint (hubs only).
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Starts the server (again, after [`NatsServer::kill`]) on its port
    /// and store.
    pub async fn spawn(&mut self) -> Result<()> {
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
            let mut ports = (None, 0u16, 0u16, 0u16);
            let parse = |rest: &str| {
                rest.rsplit(':')
                    .next()
                    .and_then(|p| p.trim().parse::<u16>().ok())
            };
            let mut last = String::new();
            while let Some(line) = lines.next_line().await? {
                last = line.clone();
                if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                    ports.0 = parse(rest);
                }
                if let Some(rest) = line.split("Listening for leafnode connections on ").nth(1) {
                    ports.1 = parse(rest).unwrap_or(0);
                }
                if let Some(rest) = line.split("Starting http monitor on ").nth(1) {
                    ports.2 = parse(rest).unwrap_or(0);
                }
                if let Some(rest) = line.split("Listening for websocket clients on ").nth(1) {
                    ports.3 = parse(rest).unwrap_or(0);
                }
                if line.contains("Server is ready") {
                    let client = ports
                        .0
                        .ok_or_else(|| anyhow!("server ready but no port seen"))?;
                    return Ok((client, ports.1, ports.2, ports.3));
                }
                if line.contains("[FTL]") || line.contains("[ERR]") {
                    bail!("nats-server: {line}");
                }
            }
            bail!("nats-server exited before it was ready: {last}")
        };
        let (port, leaf_port, http_port, ws_port) =
            tokio::time::timeout(Duration::from_secs(20), wait_ready).await??;
        // Keep draining the log so the server never blocks on a full pipe.
        let log = self.dir.path().join("nats.log");
        let logged = self.logged.clone();
        tokio::spawn(async move {
            let mut out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .ok();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(f) = out.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(f, "{line}");
                }
                logged.notify_waiters();
            }
        });
        self.port = port;
        self.leaf_port = leaf_port;
        self.http_port = http_port;
        self.ws_port = ws_port;
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

    /// Three servers forming one JetStream cluster on loopback (servers `n1`..`n3`,
    /// cluster `unidesk`), each with its own store; returns once the cluster
    /// has a JetStream meta leader.
    pub async fn cluster(sync_always: bool) -> Result<Vec<NatsServer>> {
        Self::cluster_with(
            NatsOptions {
                sync_always,
                ..Default::default()
            },
            None,
        )
        .await
    }

    /// [`NatsServer::cluster`], each member configured by `base` (its
    /// `extra` text follows the cluster block); `user` is who asks whether
    /// the cluster is ready, when `base` has accounts.
    pub async fn cluster_with(
        base: NatsOptions,
        user: Option<(&str, &str)>,
    ) -> Result<Vec<NatsServer>> {
        let ports: Vec<u16> = (0..3)
            .map(|_| {
                Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                    .local_addr()?
                    .port())
            })
            .collect::<Result<_>>()?;
        let mut servers = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let routes: Vec<String> = ports
                .iter()
                .filter(|p| *p != port)
                .map(|p| format!("nats-route://127.0.0.1:{p}"))
                .collect();
            let extra = format!(
                "server_name: n{}\ncluster {{\n  name: unidesk\n  listen: 127.0.0.1:{port}\n  routes: [{}]\n}}\n",
                i + 1,
                routes.join(", ")
            );
            servers.push(
                NatsServer::start_with(NatsOptions {
                    extra: extra + &base.extra,
                    ..base.clone()
                })
                .await?,
            );
        }
        // Ready when JetStream answers with a meta leader.
        let client = match user {
            Some((user, password)) => {
                async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
                    .connect(servers[0].url())
                    .await?
            }
            None => servers[0].connect().await?,
        };
        let js = async_nats::jetstream::with_domain(client, "hub");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while js.query_account().await.is_err() {
            if tokio::time::Instant::now() > deadline {
                bail!("the cluster has no JetStream leader after 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(servers)
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
        Self::create_with("").await
    }

    /// A database whose tables live in `tablespace`.
    pub async fn create_in(tablespace: &str) -> Result<Self> {
        Self::create_with(&format!(" TABLESPACE {tablespace}")).await
    }

    async fn create_with(options: &str) -> Result<Self> {
        let client = Self::admin().await?;
        let name = format!("t_{}", uuid::Uuid::now_v7().simple());
        client
            .batch_execute(&format!("CREATE DATABASE {name}{options}"))
            .await?;
        let url = with_database(&admin_url()?, &name);
        Ok(Self { name, url })
    }

    /// A client of the cluster's administrative database.
    pub async fn admin() -> Result<tokio_postgres::Client> {
        let admin = admin_url()?;
        let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
            .await
            .with_context(|| format!("cannot connect to {admin}"))?;
        tokio::spawn(conn);
        Ok(client)
    }

    pub async fn connect(&self) -> Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }
}

/// A small filesystem of its own (a tmpfs), to see what happens when a disk
/// fills. Mounting needs root; [`SmallDisk::mount`] says `None` where it is
/// not allowed. Unmounted on drop (lazily, should something still use it).
pub struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    pub fn mount(size_mb: u64) -> Result<Option<Self>> {
        let dir = tempfile::tempdir()?;
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_mb}m,mode=0755"),
                "tmpfs",
            ])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => Ok(Some(Self { dir })),
            _ => Ok(None),
        }
    }

    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Fills the disk with a file `filler` until no byte is left.
    pub fn fill(&self) -> Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(self.dir.path().join("filler"))?;
        let chunk = vec![0u8; 64 * 1024];
        loop {
            match f.write(&chunk) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => return Ok(()), // ENOSPC
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Frees what [`SmallDisk::fill`] took.
    pub fn unfill(&self) -> Result<()> {
        std::fs::remove_file(self.dir.path().join("filler"))?;
        Ok(())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// A TCP relay to a local port that can cut the link and restore it, to
/// test what crosses a network (a node's uplink, for one).
pub struct Relay {
    port: u16,
    up: tokio::sync::watch::Sender<bool>,
    /// Bytes relayed so far, both ways.
    bytes: tokio::sync::watch::Sender<u64>,
    /// Connections refused while cut.
    refused: tokio::sync::watch::Sender<u64>,
}

/// Copies `from` to `to`, counting what passes, until either side ends.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    bytes: tokio::sync::watch::Sender<u64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        bytes.send_modify(|b| *b += n as u64);
    }
    let _ = to.shutdown().await;
}

impl Relay {
    pub async fn start(target: u16) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (up, rx) = tokio::sync::watch::channel(true);
        let (bytes, _) = tokio::sync::watch::channel(0u64);
        let (refused, _) = tokio::sync::watch::channel(0u64);
        let (counted, refusals) = (bytes.clone(), refused.clone());
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if !*rx.borrow() {
                    refusals.send_modify(|r| *r += 1);
                    continue; // refused while cut: dropped at once
                }
                let mut rx = rx.clone();
                let counted = counted.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    let (ir, iw) = inbound.into_split();
                    let (or, ow) = outbound.into_split();
                    tokio::select! {
                        _ = async { tokio::join!(pump(ir, ow, counted.clone()), pump(or, iw, counted.clone())) } => {}
                        _ = rx.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Ok(Self {
            port,
            up,
            bytes,
            refused,
        })
    }

    /// Bytes relayed so far, both ways.
    pub fn bytes(&self) -> u64 {
        *self.bytes.borrow()
    }

    /// Connections refused so far while cut.
    pub fn refusals(&self) -> u64 {
        *self.refused.borrow()
    }

    /// Waits until at least `n` bytes went through.
    pub async fn relayed(&self, n: u64) {
        let _ = self.bytes.subscribe().wait_for(|b| *b >= n).await;
    }

    /// Waits until at least `n` connections were refused while cut.
    pub async fn refused(&self, n: u64) {
        let _ = self.refused.subscribe().wait_for(|r| *r >= n).await;
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        let _ = self.up.send(false);
    }

    pub fn restore(&self) {
        let _ = self.up.send(true);
    }
}
