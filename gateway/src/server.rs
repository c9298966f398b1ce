//! The main server's services composed in one process: streams, migrations,
//! projectors, the command service and the REST API.

use std::net::SocketAddr;

use tokio::task::JoinHandle;
use tracing::info;
use ud_core::{EventStore, TaskCommands};
use ud_projections::{Db, Projector, ProjectorOptions};
use ud_schemas::streams;

use crate::{AppState, Projected};

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub nats_url: String,
    /// JetStream domain to address (`None` on the hub itself).
    pub js_domain: Option<String>,
    pub database_url: String,
    pub listen: String,
    pub replicas: usize,
    pub run_projectors: bool,
    /// Compute nodes: hub reconciliation, ingest, liveness and scheduling.
    pub edge: Option<EdgeConfig>,
    /// The object store for files, task inputs and outputs, and log archives.
    pub storage: Option<ud_storage::Storage>,
    /// The main server's own disks to watch (JetStream store, PostgreSQL data, backups).
    pub disk: crate::health::DiskWatch,
}

impl ServerConfig {
    /// One instance on these servers, as tests and benchmarks run it: the API
    /// on a free loopback port, projectors on, one replica per stream, no
    /// compute nodes, no object store, no watched disks.
    pub fn local(nats_url: impl Into<String>, database_url: impl Into<String>) -> Self {
        Self {
            nats_url: nats_url.into(),
            js_domain: None,
            database_url: database_url.into(),
            listen: "127.0.0.1:0".into(),
            replicas: 1,
            run_projectors: true,
            edge: None,
            storage: None,
            disk: Default::default(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct EdgeConfig {
    /// Set when this instance manages the hub's node users (it needs the
    /// platform's own NATS credentials to write them into the accounts file).
    pub hub: Option<ud_core::edge::hub::HubSettings>,
    pub controller: ud_core::edge::scheduler::ControllerSettings,
    /// Repository credentials handed to nodes for their fetches.
    pub git_credentials: ud_core::edge::credentials::GitCredentials,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot connect to NATS at {url}: {reason}")]
    Nats { url: String, reason: String },
    #[error("cannot set up the streams: {0}")]
    Streams(String),
    #[error("PostgreSQL: {0}")]
    Db(#[from] ud_projections::ProjectionError),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
}

/// A started server; dropping it stops nothing, `stop` or `shutdown` does.
pub struct Running {
    pub addr: SocketAddr,
    pub state: AppState,
    tasks: Vec<JoinHandle<()>>,
    /// The ingest, which hands over when `stop_ingest` turns true.
    ingest: Option<JoinHandle<()>>,
    stop_ingest: tokio::sync::watch::Sender<bool>,
}

impl Running {
    /// Stops everything at once, as a crash would.
    pub fn shutdown(self) {
        for t in self.tasks.into_iter().chain(self.ingest) {
            t.abort();
        }
    }

    /// Stops gracefully: the ingest hands over to a standby instance first
    /// (see [`ud_core::edge::ingest::run`]), then everything else stops.
    pub async fn stop(mut self) {
        let _ = self.stop_ingest.send(true);
        if let Some(mut ingest) = self.ingest.take() {
            let patience = ud_core::edge::ingest::HANDOVER + std::time::Duration::from_secs(5);
            if tokio::time::timeout(patience, &mut ingest).await.is_err() {
                tracing::warn!("the ingest did not hand over in time");
                ingest.abort();
            }
        }
        self.shutdown();
    }

    /// Waits until the API server ends (it does not end by itself).
    pub async fn wait(&mut self) {
        if let Some(api) = self.tasks.last_mut() {
            let _ = api.await;
        }
    }
}

/// Connects to the servers of `url`: one URL, or several separated by commas
/// (the members of a cluster; the client moves to another when one fails).
/// Credentials are taken from the first URL that carries them.
pub async fn connect_nats(url: &str, name: &str) -> Result<async_nats::Client, StartError> {
    connect_nats_with(url, name, false).await
}

/// Like [`connect_nats`], through a [`ud_core::guard`] for each server when
/// `guarded` (a `tls://` server is reached directly: the guard cannot read it).
pub async fn connect_nats_with(
    url: &str,
    name: &str,
    guarded: bool,
) -> Result<async_nats::Client, StartError> {
    let fail = |reason: String| StartError::Nats {
        url: redact(url),
        reason,
    };
    let mut addrs: Vec<async_nats::ServerAddr> = url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| u.parse().map_err(|e: std::io::Error| fail(e.to_string())))
        .collect::<Result<_, _>>()?;
    if addrs.is_empty() {
        return Err(fail("no server address".into()));
    }
    // Credentials in the URL are passed explicitly: the client does not take them from it.
    let creds = addrs.iter().find_map(|a| a.username().zip(a.password()));
    let options = match creds {
        Some((u, p)) => {
            async_nats::ConnectOptions::with_user_and_password(u.to_owned(), p.to_owned())
        }
        None => async_nats::ConnectOptions::new(),
    };
    let mut options = options.name(name);
    let plain = |a: &async_nats::ServerAddr| !a.tls_required() && a.scheme() == "nats";
    if guarded && !addrs.iter().all(plain) {
        tracing::warn!(
            "NATS over TLS or WebSocket: node and command input is read without the guard"
        );
    } else if guarded {
        let upstreams: Vec<(String, u16)> = addrs
            .iter()
            .map(|a| (a.host().to_owned(), a.port()))
            .collect();
        let local = ud_core::guard::start(&upstreams)
            .await
            .map_err(|e| fail(format!("starting the guard: {e}")))?;
        addrs = local
            .iter()
            .map(|l| format!("nats://{l}").parse())
            .collect::<Result<_, std::io::Error>>()
            .map_err(|e| fail(e.to_string()))?;
        // Servers a cluster announces would be reached around the guard.
        options = options.ignore_discovered_servers();
    }
    // A hub reloading its accounts (a node enrolled or revoked) resets or refuses
    // new connections for a moment, even with the right password: try again for
    // a few seconds before saying the connection is impossible.
    let deadline = std::time::Instant::now() + CONNECT_PATIENCE;
    let mut delay = std::time::Duration::from_millis(50);
    loop {
        match options.clone().connect(addrs.clone()).await {
            Ok(client) => return Ok(client),
            Err(e) if std::time::Instant::now() + delay < deadline => {
                tracing::debug!(error = %e, "connecting to NATS failed; trying again");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_millis(500));
            }
            Err(e) => return Err(fail(e.to_string())),
        }
    }
}

/// Errors of a JetStream that is still coming up (a cluster electing its
/// leader or waiting for its peers), as opposed to a refused configuration.
fn jetstream_forming(error: &str) -> bool {
    [
        "no suitable peers",
        "temporarily unavailable",
        "timed out",
        "no responders",
    ]
    .iter()
    .any(|s| error.contains(s))
}

/// How long a first connection is retried before it counts as failed.
const CONNECT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(4);

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    let one = |url: &str| match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, host))) => format!("{scheme}://***@{host}"),
        _ => url.to_owned(),
    };
    url.split(',')
        .map(|u| one(u.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

pub async fn start(cfg: ServerConfig) -> Result<Running, StartError> {
    let client = connect_nats(&cfg.nats_url, "unidesk-server").await?;
    let store = EventStore::new(client, cfg.js_domain.as_deref().filter(|d| !d.is_empty()));
    // A cluster still forming has no peers for replicated streams yet, and a
    // JetStream just started can be briefly away: wait for it, a while.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match store.ensure_streams(cfg.replicas).await {
            Ok(()) => break,
            Err(e) if std::time::Instant::now() < deadline && jetstream_forming(&e.to_string()) => {
                tracing::warn!(error = %e, "JetStream not ready for the streams yet; trying again");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => return Err(StartError::Streams(e.to_string())),
        }
    }
    let db = Db::connect(&cfg.database_url, "public", 16).await?;
    db.migrate().await?;
    let mut tasks = Vec::new();
    if cfg.run_projectors {
        // Projectors get connections of their own (a held advisory lock and
        // a batch connection each), so a burst of API reads never starves
        // the read models of the writes that keep them current.
        let projector_db =
            Db::connect(&cfg.database_url, "public", 2 * streams::PROJECTED.len()).await?;
        for stream in streams::PROJECTED {
            let projector = Projector::new(
                projector_db.clone(),
                store.jetstream().clone(),
                stream,
                ProjectorOptions::live(stream),
            );
            tasks.push(tokio::spawn(async move { projector.run_forever().await }));
        }
    }
    // What nodes and integrations send comes in on a connection of its own,
    // through the guard: the client would stop on some header blocks.
    let guarded = EventStore::new(
        connect_nats_with(&cfg.nats_url, "unidesk-server-input", true).await?,
        cfg.js_domain.as_deref().filter(|d| !d.is_empty()),
    );
    let (stop_ingest, _) = tokio::sync::watch::channel(false);
    let pinned = ud_core::edge::ingest::Pinned::default();
    let mut ingest = None;
    let commands = TaskCommands::new(store.clone())
        .await
        .map_err(|e| StartError::Streams(e.to_string()))?;
    let (service_client, service_commands) = (guarded.client().clone(), commands.clone());
    tasks.push(tokio::spawn(async move {
        if let Err(e) = ud_core::service::run(service_client, service_commands).await {
            tracing::error!(error = %e, "command service stopped");
        }
    }));
    if let Some(edge) = &cfg.edge {
        if let Some(hub) = edge.hub.clone() {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = ud_core::edge::hub::run(s, hub).await {
                    tracing::error!(error = %e, "hub reconciler stopped");
                }
            }));
        }
        let (c, reader) = (commands.clone(), guarded.jetstream().clone());
        let (held, stop) = (pinned.clone(), stop_ingest.subscribe());
        ingest = Some(tokio::spawn(async move {
            if let Err(e) = ud_core::edge::ingest::run(c, reader, held, stop).await {
                tracing::error!(error = %e, "ingest stopped");
            }
        }));
        let (s, creds, storage) = (
            guarded.clone(),
            edge.git_credentials.clone(),
            cfg.storage.clone(),
        );
        tasks.push(tokio::spawn(async move {
            if let Err(e) = ud_core::edge::requests::serve(s, creds, storage).await {
                tracing::error!(error = %e, "node request service stopped");
            }
        }));
        let (c, settings) = (commands.clone(), edge.controller.clone());
        tasks.push(tokio::spawn(ud_core::edge::scheduler::run(c, settings)));
    }
    if let Some(storage) = cfg.storage.clone() {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = ud_core::archive::run(s, storage).await {
                tracing::error!(error = %e, "log archiver stopped");
            }
        }));
    }
    if !cfg.disk.paths.is_empty() {
        let (js, disk) = (store.jetstream().clone(), cfg.disk.clone());
        tasks.push(tokio::spawn(crate::health::watch_disks(js, disk)));
    }
    let projected = Projected::start(store.client(), &db).await?;
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(|e| StartError::Listen {
            addr: cfg.listen.clone(),
            reason: e.to_string(),
        })?;
    let addr = listener.local_addr().map_err(|e| StartError::Listen {
        addr: cfg.listen.clone(),
        reason: e.to_string(),
    })?;
    let state = AppState::new(crate::Shared {
        commands,
        db,
        projected,
        storage: cfg.storage.clone(),
        disk: cfg.disk.clone(),
        tokens: Default::default(),
        ingest_pinned: cfg.edge.is_some().then_some(pinned),
    });
    let api_state = state.clone();
    tasks.push(tokio::spawn(async move {
        if let Err(e) = crate::serve(listener, api_state).await {
            tracing::error!(error = %e, "api server stopped");
        }
    }));
    info!(%addr, "api listening");
    Ok(Running {
        addr,
        state,
        tasks,
        ingest,
        stop_ingest,
    })
}
