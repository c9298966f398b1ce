//! The whole platform on this machine as separate processes, each one
//! killable with SIGKILL: the hub nats-server, PostgreSQL, Garage, main
//! servers (`unidesk serve`) and compute nodes (a leaf nats-server behind a
//! relay that can cut its link, and an agent `unidesk-edge run`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use tokio::process::{Child, Command};
use ud_testkit::{Garage, NatsOptions, NatsServer, Relay, SmallDisk};

const PLATFORM_PW: &str = "faults-platform";
const SYSTEM_PW: &str = "faults-system";
const AGENT_PW: &str = "faults-agent";
/// The shell functions the scripts start PostgreSQL with (one way to do it).
const DEPS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/deps.sh");

/// Where libfaketime is on Debian (package `faketime`).
const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// How the platform is set up for the suite.
#[derive(Clone, Debug)]
pub struct Timing {
    /// Seconds between a node's heartbeats.
    pub heartbeat: u64,
    /// Seconds of silence before a node is offline.
    pub offline_after: u64,
    /// Seconds an offline node's runs wait before they are lost and placed again.
    pub lost_after: u64,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub fn faketime_available() -> bool {
    Path::new(FAKETIME).exists()
}

/// A program started again and again with the same arguments, its output
/// appended to one log file.
pub struct Proc {
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn new(
        name: &str,
        program: &Path,
        args: &[&str],
        env: Vec<(String, String)>,
        logs: &Path,
    ) -> Self {
        Self {
            name: name.to_owned(),
            program: program.to_owned(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            env,
            log: logs.join(format!("{name}.log")),
            child: None,
        }
    }

    /// Starts it (with `extra` settings on top of its own).
    pub fn spawn_with(&mut self, extra: &[(String, String)]) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.env.iter().cloned())
            .envs(extra.iter().cloned())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn spawn(&mut self) -> Result<()> {
        self.spawn_with(&[])
    }

    /// SIGKILL, and reaped.
    pub async fn kill9(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().await?;
        }
        Ok(())
    }

    /// Whether it ended on its own (with its status).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// A PostgreSQL cluster of the suite's own (so that it can be restarted).
pub struct Pg {
    dir: PathBuf,
    pub port: u16,
}

impl Pg {
    async fn shell(&self, call: &str) -> Result<()> {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "set -e; source {DEPS:?}; ud_find_pg_bin; {call} \"$1\" \"$2\" off"
            ))
            .arg("pg")
            .arg(&self.dir)
            .arg(self.port.to_string())
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "{call}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    async fn start(dir: PathBuf) -> Result<Self> {
        let pg = Self {
            dir,
            port: free_port()?,
        };
        pg.shell("ud_start_pg").await?;
        Ok(pg)
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// An immediate stop: what a crash leaves (the next start recovers from the WAL).
    pub async fn crash(&self) -> Result<()> {
        self.shell("ud_stop_pg").await
    }

    pub async fn start_again(&self) -> Result<()> {
        self.shell("ud_start_pg").await
    }
}

/// A compute node: its link relay, leaf nats-server and agent.
pub struct Node {
    pub name: String,
    pub id: String,
    pub relay: Relay,
    pub leaf: Proc,
    pub agent: Proc,
    /// The node's work directory on a small disk of its own, when it has one.
    pub disk: Option<SmallDisk>,
}

impl Node {
    /// Starts the agent with its clock `offset` seconds off (libfaketime,
    /// wall clock only: timers keep real time, as on a badly set machine).
    pub fn spawn_agent_skewed(&mut self, offset: i64) -> Result<()> {
        self.agent.spawn_with(&[
            ("LD_PRELOAD".into(), FAKETIME.into()),
            ("FAKETIME".into(), format!("{offset:+}s")),
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
            ("FAKETIME_NO_CACHE".into(), "1".into()),
        ])
    }
}

pub struct Stack {
    pub work: tempfile::TempDir,
    pub logs: PathBuf,
    pub bins: Bins,
    pub hub: NatsServer,
    pub pg: Pg,
    pub garage: Garage,
    pub servers: Vec<Proc>,
    pub apis: Vec<String>,
    pub nodes: Vec<Node>,
    pub admin: String,
    pub http: reqwest::Client,
    pub timing: Timing,
}

/// The platform's programs, built beside this one.
pub struct Bins {
    pub unidesk: PathBuf,
    pub edge: PathBuf,
}

impl Bins {
    pub fn beside_this_program() -> Result<Self> {
        let me = std::env::current_exe()?;
        let dir = me.parent().ok_or_else(|| anyhow!("no directory"))?;
        let bins = Self {
            unidesk: dir.join("unidesk"),
            edge: dir.join("unidesk-edge"),
        };
        for b in [&bins.unidesk, &bins.edge] {
            if !b.exists() {
                bail!(
                    "{} is missing: build it with `cargo build -p unidesk -p ud-edge-agent` (the same profile as ud-bench)",
                    b.display()
                );
            }
        }
        Ok(bins)
    }
}

fn env(pairs: &[(&str, String)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

async fn output(program: &Path, args: &[&str], env: &[(String, String)]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .envs(env.iter().cloned())
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "{} {}: {}",
            program.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

impl Stack {
    /// Starts everything: `servers` main servers and `nodes` compute nodes
    /// (the last one with its work directory on a small disk of its own).
    pub async fn start(servers: usize, nodes: usize, timing: Timing) -> Result<Self> {
        let bins = Bins::beside_this_program()?;
        let work = tempfile::Builder::new().prefix("ud-faults.").tempdir()?;
        let logs = work.path().join("logs");
        std::fs::create_dir_all(&logs)?;
        let base = [
            ("UD_PLATFORM_PASSWORD", PLATFORM_PW.to_owned()),
            ("UD_HUB_SYSTEM_PASSWORD", SYSTEM_PW.to_owned()),
        ];
        let accounts = output(&bins.unidesk, &["admin", "hub-accounts"], &env(&base)).await?;
        let hub = NatsServer::start_with(NatsOptions {
            hub: true,
            accounts: Some(accounts),
            // As in production: every write synced.
            sync_always: true,
            ..Default::default()
        })
        .await?;
        let pg = Pg::start(work.path().join("pg")).await?;
        let garage = Garage::start().await?;
        let nats_url = format!("nats://platform:{PLATFORM_PW}@127.0.0.1:{}", hub.port());
        let secrets_key = work.path().join("secrets.key");
        output(
            &bins.unidesk,
            &[
                "admin",
                "secret-key",
                "--out",
                &secrets_key.to_string_lossy(),
            ],
            &[],
        )
        .await?;
        let mut common = env(&base);
        common.extend(env(&[
            ("UD_NATS_URL", nats_url.clone()),
            ("UD_DATABASE_URL", pg.url()),
            (
                "UD_SECRETS_KEY_FILE",
                secrets_key.to_string_lossy().into_owned(),
            ),
            (
                "UD_HUB_ACCOUNTS_FILE",
                hub.accounts_file().to_string_lossy().into_owned(),
            ),
            (
                "UD_HUB_PID_FILE",
                hub.pid_file().to_string_lossy().into_owned(),
            ),
            ("UD_S3_ENDPOINT", garage.endpoint.clone()),
            ("UD_S3_REGION", garage.region.clone()),
            ("UD_S3_BUCKET", garage.bucket.clone()),
            ("UD_S3_ACCESS_KEY_ID", garage.access_key_id.clone()),
            ("UD_S3_SECRET_ACCESS_KEY", garage.secret_access_key.clone()),
            (
                "UD_HEARTBEAT_TIMEOUT_SECONDS",
                timing.offline_after.to_string(),
            ),
            ("UD_LOST_AFTER_SECONDS", timing.lost_after.to_string()),
            ("UD_CANCEL_GRACE_SECONDS", "2".into()),
            ("RUST_LOG", "info".into()),
        ]));
        let mut procs = Vec::new();
        let mut apis = Vec::new();
        for i in 0..servers {
            let listen = format!("127.0.0.1:{}", free_port()?);
            let mut e = common.clone();
            e.push(("UD_LISTEN".into(), listen.clone()));
            let mut p = Proc::new(
                &format!("server{}", i + 1),
                &bins.unidesk,
                &["serve"],
                e,
                &logs,
            );
            p.spawn()?;
            procs.push(p);
            apis.push(format!("http://{listen}"));
        }
        let mut stack = Self {
            work,
            logs,
            bins,
            hub,
            pg,
            garage,
            servers: procs,
            apis,
            nodes: Vec::new(),
            admin: String::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            timing,
        };
        for i in 0..servers {
            stack.until_ready(i, Duration::from_secs(120)).await?;
        }
        stack.admin = output(
            &stack.bins.unidesk,
            &["admin", "issue-token", "--name", "faults", "--admin"],
            &env(&[("UD_NATS_URL", nats_url)]),
        )
        .await?;
        for i in 0..nodes {
            let small = i + 1 == nodes && nodes > 1;
            let node = stack.start_node(&format!("node{}", i + 1), small).await?;
            stack.nodes.push(node);
        }
        Ok(stack)
    }

    /// The hub as the platform's user.
    pub fn nats_url(&self) -> String {
        format!(
            "nats://platform:{PLATFORM_PW}@127.0.0.1:{}",
            self.hub.port()
        )
    }

    /// A client of the hub as the platform's user.
    pub async fn nats(&self) -> Result<async_nats::Client> {
        Ok(async_nats::ConnectOptions::with_user_and_password(
            "platform".into(),
            PLATFORM_PW.into(),
        )
        .connect(format!("127.0.0.1:{}", self.hub.port()))
        .await?)
    }

    pub fn server_env(&self) -> Vec<(String, String)> {
        env(&[
            ("UD_API_URL", self.apis[0].clone()),
            ("UD_TOKEN", self.admin.clone()),
        ])
    }

    /// Waits until main server `i` answers `/readyz`.
    pub async fn until_ready(&mut self, i: usize, bound: Duration) -> Result<()> {
        let deadline = Instant::now() + bound;
        loop {
            if let Ok(r) = self
                .http
                .get(format!("{}/readyz", self.apis[i]))
                .send()
                .await
            {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if let Some(status) = self.servers[i].exited() {
                bail!(
                    "{} ended ({status}):\n{}",
                    self.servers[i].name,
                    self.servers[i].log_tail(30)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not ready within {bound:?}:\n{}",
                    self.servers[i].name,
                    self.servers[i].log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A request to the first main server that answers (servers may be down).
    pub async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value> {
        let mut last = None;
        for base in &self.apis {
            let mut req = self
                .http
                .request(method.clone(), format!("{base}{path}"))
                .bearer_auth(&self.admin);
            if let Some(b) = body {
                req = req.json(b);
            }
            match req.send().await {
                Ok(r) if r.status().is_success() => return Ok(r.json().await?),
                Ok(r) if r.status().is_server_error() => {
                    last = Some(anyhow!(
                        "{path}: {}: {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    ))
                }
                Ok(r) => bail!(
                    "{path}: {}: {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                ),
                Err(e) => last = Some(e.into()),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no main server")))
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        self.api(reqwest::Method::GET, path, None).await
    }

    async fn start_node(&mut self, name: &str, small_disk: bool) -> Result<Node> {
        let enrolled = self
            .api(
                reqwest::Method::POST,
                "/api/v1/nodes",
                Some(&json!({"name": name})),
            )
            .await?;
        let token = enrolled["token"]
            .as_str()
            .ok_or_else(|| anyhow!("no node token: {enrolled}"))?
            .to_owned();
        let id = enrolled["node_id"].as_str().unwrap_or_default().to_owned();
        let relay = Relay::start(self.hub.leaf_port()).await?;
        let dir = self.work.path().join(name);
        std::fs::create_dir_all(&dir)?;
        let leaf_port = free_port()?;
        let token_env = env(&[("UD_NODE_TOKEN", token.clone())]);
        let conf = output(
            &self.bins.edge,
            &[
                "leaf-config",
                "--hub",
                &format!("nats-leaf://127.0.0.1:{}", relay.port()),
                "--allow-plain-link",
                "--store-dir",
                &dir.join("js").to_string_lossy(),
                "--port",
                &leaf_port.to_string(),
                "--agent-password",
                AGENT_PW,
            ],
            &token_env,
        )
        .await?;
        let conf_file = dir.join("leaf.conf");
        std::fs::write(&conf_file, conf)?;
        let nats = std::env::var("UD_NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
        let mut leaf = Proc::new(
            &format!("{name}-leaf"),
            Path::new(&nats),
            &["-c", &conf_file.to_string_lossy()],
            Vec::new(),
            &self.logs,
        );
        leaf.spawn()?;
        let disk = if small_disk {
            SmallDisk::mount(64)?
        } else {
            None
        };
        let work_dir = disk
            .as_ref()
            .map_or_else(|| dir.join("work"), |d| d.path().to_owned());
        let mut agent_env = token_env;
        agent_env.extend(env(&[
            (
                "UD_EDGE_LEAF_URL",
                format!("nats://agent:{AGENT_PW}@127.0.0.1:{leaf_port}"),
            ),
            ("UD_EDGE_WORK_DIR", work_dir.to_string_lossy().into_owned()),
            (
                "UD_EDGE_HEARTBEAT_SECONDS",
                self.timing.heartbeat.to_string(),
            ),
            ("UD_EDGE_MIN_FREE_DISK_MB", "8".into()),
            ("UD_EDGE_RESERVE_CPUS", "0".into()),
            ("UD_EDGE_RESERVE_MEMORY_MB", "0".into()),
            ("RUST_LOG", "info".into()),
        ]));
        let mut agent = Proc::new(
            name,
            &self.bins.edge,
            &["run", "--name", name],
            agent_env,
            &self.logs,
        );
        agent.spawn()?;
        Ok(Node {
            name: name.to_owned(),
            id,
            relay,
            leaf,
            agent,
            disk,
        })
    }

    /// Every node online, as the API says.
    pub async fn all_online(&self) -> bool {
        let Ok(nodes) = self.get("/api/v1/nodes").await else {
            return false;
        };
        let list = nodes
            .as_array()
            .or_else(|| nodes["nodes"].as_array())
            .cloned()
            .unwrap_or_default();
        self.nodes.iter().all(|n| {
            list.iter()
                .any(|v| v["id"] == n.id.as_str() && v["status"] == "online")
        })
    }

    /// Stops the agents before the rest, and removes the containers they left.
    pub async fn stop(mut self, keep: bool) -> Result<Option<PathBuf>> {
        for n in &mut self.nodes {
            n.agent.kill9().await?;
            n.leaf.kill9().await?;
        }
        for s in &mut self.servers {
            s.kill9().await?;
        }
        let _ = self.garage.stop().await;
        let _ = self.pg.crash().await;
        remove_containers(&self.nodes).await;
        if keep {
            Ok(Some(self.work.keep()))
        } else {
            Ok(None)
        }
    }
}

async fn remove_containers(nodes: &[Node]) {
    let Ok(docker) = bollard::Docker::connect_with_local_defaults() else {
        return;
    };
    for n in nodes {
        let filters = std::collections::HashMap::from([(
            "label".to_owned(),
            vec![format!("io.unidesk.node={}", n.id)],
        )]);
        let list = docker
            .list_containers(Some(bollard::query_parameters::ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .unwrap_or_default();
        for c in list {
            if let Some(id) = c.id {
                let _ = docker
                    .remove_container(
                        &id,
                        Some(bollard::query_parameters::RemoveContainerOptions {
                            force: true,
                            ..Default::default()
                        }),
                    )
                    .await;
            }
        }
    }
}
