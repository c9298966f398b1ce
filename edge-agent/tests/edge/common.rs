//! What the compute-node tests share: a hub nats-server with leaf nodes,
//! PostgreSQL, the main server, agents and a real Docker engine.
#![allow(dead_code)] // each test binary uses part of it

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use futures::StreamExt;
use serde_json::{json, Value};
use ud_edge_agent::AgentConfig;
use ud_schemas::edge::{self, NodeToken};
use ud_schemas::NodeId;
use ud_server::{self as server, EdgeConfig, Running, ServerConfig};
use ud_testkit::{NatsOptions, NatsServer, PgDatabase};

/// How long a freshly joined node may take to be online: its leaf links once
/// the hub has reloaded its accounts with the node, and its agent forwards
/// its registration at once. An upper bound (a loaded machine): a node
/// online sooner ends the wait.
pub const JOIN: Duration = Duration::from_secs(120);

pub const PLATFORM_PW: &str = "platform-secret";
pub const AGENT_PW: &str = "agent-secret";
pub const SYSTEM_PW: &str = "system-secret";
pub const IMAGE: &str = "unidesk/busybox:base";
/// Sessions of test stacks: `*.localhost` is loopback, on the API's port.
pub const SESSION_ORIGIN: &str = "http://{id}.s.localhost";

pub struct Stack {
    /// The authority of the hub's leaf-node certificate: every link is TLS.
    pub ca: ud_testkit::TestCa,
    pub hub: NatsServer,
    pub pg: PgDatabase,
    pub server: Running,
    pub http: reqwest::Client,
    pub base: String,
    pub admin: String,
    pub notices: async_nats::Subscriber,
}

pub struct Node {
    pub id: NodeId,
    pub token: NodeToken,
    pub leaf: NatsServer,
    pub agent: tokio::task::JoinHandle<()>,
    /// Removes the node's containers when the test is done with it.
    pub containers: Containers,
}

/// The containers of one node, removed when dropped: runs a test leaves
/// going (a session, a long sleep) end with the test instead of piling up
/// in the engine.
pub struct Containers(pub NodeId);

impl Drop for Containers {
    fn drop(&mut self) {
        let filter = format!("label={}={}", ud_edge_agent::docker::LABEL_NODE, self.0);
        let Ok(found) = std::process::Command::new("docker")
            .args(["ps", "-aq", "--filter", &filter])
            .output()
        else {
            return;
        };
        let ids: Vec<String> = String::from_utf8_lossy(&found.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        if !ids.is_empty() {
            let _ = std::process::Command::new("docker")
                .args(["rm", "-f"])
                .args(&ids)
                .output();
        }
    }
}

pub fn initial_accounts() -> Result<String> {
    let hash = bcrypt::hash(PLATFORM_PW, 4)?;
    let system = ud_core::edge::hubconf::SystemUser {
        user: "sys".into(),
        password_hash: bcrypt::hash(SYSTEM_PW, 4)?,
    };
    Ok(ud_core::edge::hubconf::accounts_with_system(
        "platform",
        &hash,
        &[],
        Some(&system),
    ))
}

/// Every log line the servers and agents of this test binary wrote, at
/// `info` and above (what an operator's log would hold), beside what the
/// test output shows (`UD_LOG`, default `warn`).
static LOGGED: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

/// Most log bytes kept: the oldest half goes when it is reached.
const LOGGED_MAX: usize = 256 << 20;

/// Woken whenever a log line is kept.
static LOG_WRITTEN: tokio::sync::Notify = tokio::sync::Notify::const_new();

struct Logged;

impl std::io::Write for Logged {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut l) = LOGGED.lock() {
            if l.len() + buf.len() > LOGGED_MAX {
                let half = l.len() / 2;
                l.drain(..half);
            }
            l.extend_from_slice(buf);
        }
        LOG_WRITTEN.notify_waiters();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether any log line so far holds `needle`.
pub fn logged(needle: &str) -> bool {
    LOGGED
        .lock()
        .map(|l| l.windows(needle.len()).any(|w| w == needle.as_bytes()))
        .unwrap_or(false)
}

/// Waits until a log line holds `needle`.
pub async fn until_logged(needle: &str, timeout: Duration) -> Result<()> {
    let wait = async {
        loop {
            let written = LOG_WRITTEN.notified();
            tokio::pin!(written);
            // Registered before looking, so that no line is missed between.
            written.as_mut().enable();
            if logged(needle) {
                return;
            }
            written.await;
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| anyhow!("nothing logged {needle:?} within {timeout:?}"))
}

fn init_tracing() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{fmt, EnvFilter, Layer};
    let shown = fmt::layer()
        .with_test_writer()
        .with_filter(EnvFilter::try_from_env("UD_LOG").unwrap_or_else(|_| "warn".into()));
    let kept = fmt::layer()
        .with_ansi(false)
        .with_writer(|| Logged)
        .with_filter(EnvFilter::new("info"));
    let _ = tracing_subscriber::registry()
        .with(shown)
        .with(kept)
        .try_init();
}

/// A fresh key for project secrets.
pub fn secret_key() -> ud_core::secrets::SecretKey {
    ud_core::secrets::SecretKey::random().0
}

impl Stack {
    pub async fn start(heartbeat_timeout: Duration) -> Result<Self> {
        Self::start_with(heartbeat_timeout, Default::default(), Default::default()).await
    }

    pub async fn start_with(
        heartbeat_timeout: Duration,
        git_credentials: ud_core::edge::credentials::GitCredentials,
        queues: ud_core::edge::scheduler::Queues,
    ) -> Result<Self> {
        Self::start_full(heartbeat_timeout, git_credentials, queues, None).await
    }

    pub async fn start_full(
        heartbeat_timeout: Duration,
        git_credentials: ud_core::edge::credentials::GitCredentials,
        queues: ud_core::edge::scheduler::Queues,
        storage: Option<ud_storage::Storage>,
    ) -> Result<Self> {
        let (creds, none) = (git_credentials, Default::default());
        Self::start_stores(heartbeat_timeout, creds, queues, storage, none).await
    }

    /// [`Stack::start_full`] with projects' own object stores.
    pub async fn start_stores(
        heartbeat_timeout: Duration,
        git_credentials: ud_core::edge::credentials::GitCredentials,
        queues: ud_core::edge::scheduler::Queues,
        storage: Option<ud_storage::Storage>,
        stores: ud_storage::StoresConfig,
    ) -> Result<Self> {
        let sessions = Self::session_settings(Some(SESSION_ORIGIN))?;
        Self::start_inner(
            heartbeat_timeout,
            git_credentials,
            queues,
            storage,
            stores,
            sessions,
        )
        .await
    }

    /// Sessions at `origin` (`None`: under `/s/<id>/`).
    pub fn session_settings(origin: Option<&str>) -> Result<ud_gateway::sessions::SessionSettings> {
        ud_gateway::sessions::SessionSettings::new(origin, Some(rand::random()))
            .map_err(|e| anyhow!(e))
    }

    /// A stack whose sessions are served as `sessions` says.
    pub async fn start_sessions(sessions: ud_gateway::sessions::SessionSettings) -> Result<Self> {
        let (creds, queues, stores) = Default::default();
        Self::start_inner(
            Duration::from_secs(60),
            creds,
            queues,
            None,
            stores,
            sessions,
        )
        .await
    }

    async fn start_inner(
        heartbeat_timeout: Duration,
        git_credentials: ud_core::edge::credentials::GitCredentials,
        queues: ud_core::edge::scheduler::Queues,
        storage: Option<ud_storage::Storage>,
        stores: ud_storage::StoresConfig,
        sessions: ud_gateway::sessions::SessionSettings,
    ) -> Result<Self> {
        init_tracing();
        let ca = ud_testkit::TestCa::new("UniDesk test hub CA")?;
        let hub = NatsServer::start_with(NatsOptions {
            hub: true,
            accounts: Some(initial_accounts()?),
            leaf_tls: Some(ca.server()?),
            websocket: true,
            ..Default::default()
        })
        .await?;
        let pg = PgDatabase::create().await?;
        let nats_url = format!("nats://platform:{PLATFORM_PW}@127.0.0.1:{}", hub.port());
        let server = server::start(ServerConfig {
            storage,
            stores,
            edge: Some(EdgeConfig {
                hub: Some(ud_core::edge::hub::HubSettings {
                    accounts_file: hub.accounts_file(),
                    pid_file: Some(hub.pid_file()),
                    platform_user: "platform".into(),
                    platform_password: PLATFORM_PW.into(),
                    system_user: Some(("sys".into(), SYSTEM_PW.into())),
                    hub_addr: format!("127.0.0.1:{}", hub.port()),
                    replicas: 1,
                }),
                controller: ud_core::edge::scheduler::ControllerSettings {
                    heartbeat_timeout,
                    check_interval: Duration::from_millis(100),
                    cancel_grace_seconds: 1,
                    placement: Default::default(),
                    queues,
                    // Lost at once unless a test's task asks for a grace.
                    lost_after: Duration::ZERO,
                    max_lost_after: Duration::from_secs(7 * 24 * 3600),
                },
                git_credentials,
            }),
            secrets: Some(secret_key()),
            sessions,
            ..ServerConfig::local(nats_url.clone(), pg.url.clone())
        })
        .await?;
        let store = server.state.commands.store().clone();
        let notices = store.client().subscribe("ud.sys.projected.>").await?;
        let issued = ud_core::commands::issue_token(
            &store,
            &ud_core::commands::NewToken::scoped("admin", &[], true),
            "test",
        )
        .await
        .map_err(|e| anyhow!("{e}"))?;
        server
            .state
            .projected
            .wait(
                ud_schemas::streams::AUTH,
                issued.seq,
                Duration::from_secs(10),
            )
            .await;
        let base = format!("http://{}", server.addr);
        Ok(Self {
            ca,
            hub,
            pg,
            server,
            http: reqwest::Client::new(),
            base,
            admin: issued.secret,
            notices,
        })
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        Ok(self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.admin)
            .send()
            .await?
            .json()
            .await?)
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Value> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.admin)
            .json(&body)
            .send()
            .await?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("{path}: {status} {text}");
        }
        Ok(if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)?
        })
    }

    /// Re-checks `check` whenever a projector commits, until it holds.
    pub async fn until<F, Fut>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: F,
    ) -> Result<Value>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<Value>>>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(v) = check().await? {
                return Ok(v);
            }
            match tokio::time::timeout_at(deadline, self.notices.next()).await {
                Ok(Some(_)) => {}
                _ => bail!("timed out waiting for {what}"),
            }
        }
    }

    pub async fn node_status(
        &mut self,
        id: NodeId,
        status: &'static str,
        timeout: Duration,
    ) -> Result<Value> {
        let (http, base, admin) = (self.http.clone(), self.base.clone(), self.admin.clone());
        let waited = self
            .until(&format!("node {id} {status}"), timeout, move || {
                let (http, base, admin) = (http.clone(), base.clone(), admin.clone());
                async move {
                    let v: Value = http
                        .get(format!("{base}/api/v1/nodes/{id}"))
                        .bearer_auth(&admin)
                        .send()
                        .await?
                        .json()
                        .await?;
                    // Online also means its registration is in.
                    let registered = status != "online" || !v["registered_at"].is_null();
                    Ok((v["status"] == status && registered).then_some(v))
                }
            })
            .await;
        match waited {
            Err(e) if status == "online" => Err(self.never_online(id, e).await),
            other => other,
        }
    }

    /// Why a node never came online, as far as the logs tell: what the hub
    /// said of reloads and of the node's stream, and what the platform's
    /// side said of the node and of the hub.
    async fn never_online(&self, id: NodeId, e: anyhow::Error) -> anyhow::Error {
        let ours = edge::stream(&id);
        let log = self.hub.log();
        let hub: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(&ours) || l.contains("eload") || l.contains("JetStream"))
            .collect();
        let node = id.to_string();
        let kept = LOGGED
            .lock()
            .map(|l| String::from_utf8_lossy(&l).into_owned())
            .unwrap_or_default();
        let platform: Vec<&str> = kept
            .lines()
            .filter(|l| l.contains(&node) || l.contains("ud_core::edge::hub"))
            .collect();
        let hub = &hub[hub.len().saturating_sub(300)..];
        let forwarded = self.forward_state(id).await;
        anyhow!(
            "{e}; what the hub has of it: {forwarded}; the hub logged:\n{}\nthe platform logged:\n{}",
            hub.join("\n"),
            platform.join("\n")
        )
    }

    /// What the hub's `UD_EDGE_IN` holds of a node's reports, and what the
    /// hub says of its link.
    pub async fn forward_state(&self, id: NodeId) -> String {
        let js = self.server.state.commands.store().jetstream().clone();
        let info = async {
            let s = js.get_stream(edge::EDGE_IN).await?;
            let mut held = s.info_with_subjects(format!("ud.edge.{id}.>")).await?;
            let mut stored = Vec::new();
            while let Some(Ok((subject, n))) = held.next().await {
                stored.push(format!("{subject}={n}"));
            }
            anyhow::Ok(format!("messages of it in {}: {stored:?}", edge::EDGE_IN))
        }
        .await
        .unwrap_or_else(|e| format!("no stream info ({e})"));
        let domain = edge::domain(&id);
        let leafz = async {
            let v: Value = reqwest::get(format!("{}/leafz?subs=1", self.hub.monitor_url()))
                .await?
                .json()
                .await?;
            anyhow::Ok(
                v["leafs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|l| {
                        l.to_string().contains(&domain) || l.to_string().contains(&id.to_string())
                    })
                    .map(|l| l.to_string())
                    .collect::<Vec<_>>()
                    .join("\n"),
            )
        }
        .await
        .unwrap_or_else(|e| format!("no leafz ({e})"));
        // What became of what was stored: the ingest's consumer, the node's
        // events, its view.
        let ingest = async {
            let mut s = js.get_stream(edge::EDGE_IN).await?;
            let mut c: async_nats::jetstream::consumer::PullConsumer = s
                .get_consumer(ud_core::edge::ingest::CONSUMER)
                .await
                .map_err(|e| anyhow!("{e}"))?;
            let i = c.info().await?;
            let nodes = js.get_stream(ud_schemas::streams::NODES).await?;
            let mut events = nodes.info_with_subjects(format!("ud.node.{id}.>")).await?;
            let mut kinds = Vec::new();
            while let Some(Ok((subject, n))) = events.next().await {
                kinds.push(format!("{subject}={n}"));
            }
            let _ = &mut s;
            anyhow::Ok(format!(
                "ingest pending {} ack-pending {} delivered {:?} floor {:?}; node events {kinds:?}",
                i.num_pending, i.num_ack_pending, i.delivered, i.ack_floor
            ))
        }
        .await
        .unwrap_or_else(|e| format!("no ingest info ({e})"));
        let view = async {
            anyhow::Ok(
                self.http
                    .get(format!("{}/api/v1/nodes/{id}", self.base))
                    .bearer_auth(&self.admin)
                    .send()
                    .await?
                    .text()
                    .await?,
            )
        }
        .await
        .unwrap_or_default();
        format!("{info}; its link: {leafz}; {ingest}; its view: {view}")
    }

    pub async fn task_state(
        &mut self,
        id: &str,
        states: &'static [&'static str],
        timeout: Duration,
    ) -> Result<Value> {
        self.task_until(id, &format!("task {id} in {states:?}"), timeout, move |v| {
            v["state"].as_str().is_some_and(|s| states.contains(&s))
        })
        .await
    }

    /// Submits `script`, waits for it to end and fails unless it succeeded.
    pub async fn runs_ok(
        &mut self,
        script: &str,
        timeout_seconds: u64,
        wait: Duration,
    ) -> Result<Value> {
        let id = self.submit(script, timeout_seconds).await?;
        let done = self
            .task_state(
                &id,
                &["succeeded", "failed", "timed_out", "cancelled"],
                wait,
            )
            .await?;
        if done["state"] != "succeeded" {
            bail!("{script:?} did not succeed: {done}");
        }
        Ok(done)
    }

    /// Re-reads task `id` whenever a projector commits, until `check` holds for it.
    pub async fn task_until<C>(
        &mut self,
        id: &str,
        what: &str,
        timeout: Duration,
        check: C,
    ) -> Result<Value>
    where
        C: Fn(&Value) -> bool + Clone,
    {
        self.view_until(&format!("/api/v1/tasks/{id}"), "task", what, timeout, check)
            .await
    }

    /// A pipeline once `check` holds for it.
    pub async fn pipeline_until<C>(
        &mut self,
        id: &str,
        what: &str,
        timeout: Duration,
        check: C,
    ) -> Result<Value>
    where
        C: Fn(&Value) -> bool + Clone,
    {
        let path = format!("/api/v1/pipelines/{id}");
        self.view_until(&path, "pipeline", what, timeout, check)
            .await
    }

    /// What the API says at `path`, once `check` holds for it (read again
    /// whenever a projector commits).
    async fn view_until<C>(
        &mut self,
        path: &str,
        kind: &str,
        what: &str,
        timeout: Duration,
        check: C,
    ) -> Result<Value>
    where
        C: Fn(&Value) -> bool + Clone,
    {
        let (http, admin, url) = (
            self.http.clone(),
            self.admin.clone(),
            format!("{}{path}", self.base),
        );
        let last = std::sync::Arc::new(std::sync::Mutex::new(Value::Null));
        let seen = last.clone();
        let result = self
            .until(what, timeout, move || {
                let (http, admin, url, check, seen) = (
                    http.clone(),
                    admin.clone(),
                    url.clone(),
                    check.clone(),
                    seen.clone(),
                );
                async move {
                    let v: Value = http
                        .get(url)
                        .bearer_auth(&admin)
                        .send()
                        .await?
                        .json()
                        .await?;
                    if let Ok(mut s) = seen.lock() {
                        *s = v.clone();
                    }
                    Ok(check(&v).then_some(v))
                }
            })
            .await;
        result.map_err(|e| {
            let last = last.lock().map(|v| v.to_string()).unwrap_or_default();
            anyhow!("{e}; the {kind} was last {last}")
        })
    }

    pub async fn enroll(&self, name: &str) -> Result<NodeToken> {
        let v = self
            .post(
                "/api/v1/nodes",
                json!({"name": name, "labels": {"zone": name}}),
            )
            .await?;
        NodeToken::parse(v["token"].as_str().unwrap_or_default()).map_err(|e| anyhow!(e))
    }

    /// Enrols a node, starts its leaf server and agent, and waits until it is online.
    pub async fn online_node(&mut self, name: &str) -> Result<Node> {
        let node = self
            .join(name, self.enroll(name).await?, Duration::from_millis(500))
            .await?;
        self.node_status(node.id, "online", JOIN).await?;
        Ok(node)
    }

    pub async fn join(&self, name: &str, token: NodeToken, heartbeat: Duration) -> Result<Node> {
        self.join_via(name, token, heartbeat, self.hub.leaf_port())
            .await
    }

    /// The node's leaf nats-server, linked to the hub over TLS through `hub_leaf_port`.
    pub async fn leaf(&self, token: &NodeToken, hub_leaf_port: u16) -> Result<NatsServer> {
        let link = edge::HubLink::Tls {
            host: "127.0.0.1".into(),
            port: hub_leaf_port,
        };
        let ca = self.ca.ca_file();
        leaf_server(token, &link, Some(&ca)).await
    }

    pub async fn join_via(
        &self,
        name: &str,
        token: NodeToken,
        heartbeat: Duration,
        hub_leaf_port: u16,
    ) -> Result<Node> {
        let leaf = self.leaf(&token, hub_leaf_port).await?;
        let agent = spawn_agent(&leaf, &token, name, heartbeat);
        Ok(Node {
            id: token.node_id,
            containers: Containers(token.node_id),
            token,
            leaf,
            agent,
        })
    }

    /// The stream sequence of a task's first event of `kind` (0: none).
    pub async fn seq_of(&self, task: &str, kind: &str) -> Result<u64> {
        let events = self.get(&format!("/api/v1/tasks/{task}/events")).await?;
        Ok(events
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["type"] == kind)
            .and_then(|e| e["seq"].as_u64())
            .unwrap_or(0))
    }

    pub async fn submit_body(&self, body: Value) -> Result<String> {
        Ok(self.post("/api/v1/tasks", body).await?["task_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    pub async fn submit(&self, script: &str, timeout_seconds: u64) -> Result<String> {
        let mut body = task_body("lab", script, json!({"cpus": 0.5, "memory_mb": 64}));
        body["timeout_seconds"] = json!(timeout_seconds);
        self.submit_body(body).await
    }
}

/// A node's leaf nats-server linked to the hub by `link`, trusting `ca`
/// (none: the system's roots).
pub async fn leaf_server(
    token: &NodeToken,
    link: &edge::HubLink,
    ca: Option<&std::path::Path>,
) -> Result<NatsServer> {
    let ca = ca.map(|c| c.to_string_lossy().into_owned());
    NatsServer::start_with(NatsOptions {
        sync_always: false,
        domain: edge::domain(&token.node_id),
        extra: edge::leaf_link_config(token, link, ca.as_deref(), AGENT_PW),
        ..Default::default()
    })
    .await
}

/// A task of `project` running `sh -c script` (in the base image the test agents use).
/// A client on a node's leaf server with the agent's credentials, its
/// replies on `node`'s inbox prefix when given (as that node's agent).
pub async fn agent_client(leaf: &NatsServer, node: Option<NodeId>) -> Result<async_nats::Client> {
    let mut options =
        async_nats::ConnectOptions::with_user_and_password("agent".into(), AGENT_PW.into());
    if let Some(node) = node {
        options = options.custom_inbox_prefix(edge::inbox_prefix(&node));
    }
    Ok(options
        .connect(format!("127.0.0.1:{}", leaf.port()))
        .await?)
}

pub fn task_body(project: &str, script: &str, resources: Value) -> Value {
    json!({
        "project": project, "code_repo_url": "https://git.example.org/c.git",
        "code_commit_id": "0123456789abcdef0123456789abcdef01234567",
        "env_repo_url": "https://git.example.org/e.git", "env_commit_id": "0123456789abcdef0123456789abcdef01234567",
        "dockerfile_path": "Dockerfile", "command": ["sh", "-c", script], "resources": resources
    })
}

/// An agent on `leaf` that runs every task in the base image.
pub fn agent_config(
    leaf: &NatsServer,
    token: &NodeToken,
    name: &str,
    heartbeat: Duration,
) -> AgentConfig {
    AgentConfig {
        leaf_url: format!("nats://agent:{AGENT_PW}@127.0.0.1:{}", leaf.port()),
        node_id: token.node_id,
        name: name.to_owned(),
        labels: BTreeMap::from([("zone".to_owned(), name.to_owned())]),
        heartbeat_interval: heartbeat,
        image: Some(IMAGE.into()),
        work_dir: std::env::temp_dir().join(format!("ud-edge-{}", token.node_id)),
        build_timeout: Duration::from_secs(600),
        min_free_disk_mb: 0,
        cache_limit_mb: 1 << 20,
        docker_host: std::env::var("DOCKER_HOST").ok(),
        ..ud_edge_agent::AgentConfig::new(String::new(), token.node_id, String::new())
    }
}

pub fn spawn_agent(
    leaf: &NatsServer,
    token: &NodeToken,
    name: &str,
    heartbeat: Duration,
) -> tokio::task::JoinHandle<()> {
    run_agent(agent_config(leaf, token, name, heartbeat))
}

pub fn run_agent(cfg: AgentConfig) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = ud_edge_agent::run(cfg).await {
            eprintln!("agent stopped: {e}");
        }
    })
}

/// The types of a task's events, in order, without `task.waiting` notes
/// (which come when another node was not online yet).
pub async fn history(s: &Stack, id: &str) -> Result<Vec<String>> {
    let events = s.get(&format!("/api/v1/tasks/{id}/events")).await?;
    Ok(events
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["type"].as_str())
        .filter(|t| *t != "task.waiting")
        .map(str::to_owned)
        .collect())
}

pub async fn logs(s: &Stack, id: &str) -> Result<String> {
    let page = s.get(&format!("/api/v1/tasks/{id}/logs")).await?;
    Ok(page["lines"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["text"].as_str())
        .collect())
}

/// The containers labelled `label=value` (a task's, a node's), running
/// ones only unless `all`.
pub async fn labelled_containers(
    label: &str,
    value: impl std::fmt::Display,
    all: bool,
) -> Result<Vec<bollard::models::ContainerSummary>> {
    let docker = bollard::Docker::connect_with_local_defaults()?;
    let filters =
        std::collections::HashMap::from([("label".to_owned(), vec![format!("{label}={value}")])]);
    Ok(docker
        .list_containers(Some(bollard::query_parameters::ListContainersOptions {
            all,
            filters: Some(filters),
            ..Default::default()
        }))
        .await?)
}
