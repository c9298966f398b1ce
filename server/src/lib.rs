//! The main server composed in one place: its streams and read models set
//! up, then every service started by name under one supervisor (projectors,
//! the command service, the hub's accounts, ingest, node requests, the
//! scheduler, the log archiver, the disk watch, the REST API), stopped by one
//! call, and restarted (or the process stopped) when one ends unexpectedly.

pub mod supervise;

use std::net::SocketAddr;
use std::time::Duration;

use tracing::info;
use ud_core::{EventStore, TaskCommands};
use ud_gateway::{AppState, Projected};
use ud_projections::{Db, Projector, ProjectorOptions};
use ud_schemas::streams;

pub use supervise::{Fatal, Policy, Supervisor};

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
    /// Projects' own object stores (`UD_STORES_FILE`), used instead of
    /// `storage` for those projects.
    pub stores: ud_storage::StoresConfig,
    /// The main server's own disks to watch (JetStream store, PostgreSQL data, backups).
    pub disk: ud_gateway::health::DiskWatch,
    /// How services that end unexpectedly are restarted.
    pub restarts: Policy,
    /// The key project secrets are encrypted with (none: tasks cannot name secrets).
    pub secrets: Option<ud_core::secrets::SecretKey>,
    /// Where sessions are served and the key their links are signed with.
    pub sessions: ud_gateway::sessions::SessionSettings,
    /// How project webhooks are tried.
    pub webhooks: ud_notify::deliver::Settings,
    /// Sign-in through an OpenID Connect provider.
    pub oidc: Option<ud_gateway::sso::OidcSettings>,
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
            stores: Default::default(),
            disk: Default::default(),
            restarts: Policy::default(),
            secrets: None,
            sessions: Default::default(),
            webhooks: Default::default(),
            oidc: None,
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
    #[error("e-mail: {0}")]
    Smtp(String),
    #[error("sign-in: {0}")]
    Oidc(#[from] ud_gateway::sso::SsoError),
    #[error("cannot connect to NATS at {url}: {reason}")]
    Nats { url: String, reason: String },
    #[error("cannot set up the streams: {0}")]
    Streams(String),
    #[error("PostgreSQL: {0}")]
    Db(#[from] ud_projections::ProjectionError),
    #[error("the event store: {0}")]
    Store(#[from] ud_core::StoreError),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("object stores: {0}")]
    Stores(#[from] ud_storage::StorageError),
}

/// A started server; dropping it stops nothing, `stop` or `shutdown` does.
pub struct Running {
    pub addr: SocketAddr,
    pub state: AppState,
    supervisor: Supervisor,
}

impl Running {
    /// Stops everything at once, as a crash would.
    pub fn shutdown(self) {
        self.supervisor.abort();
    }

    /// Stops gracefully: the ingest hands over to a standby instance first
    /// (see [`ud_core::edge::ingest::run`]), the others stop at once.
    pub async fn stop(self) {
        self.supervisor.stop().await;
    }

    /// Waits until a service stops the process (it kept ending unexpectedly).
    pub async fn wait(&mut self) -> Fatal {
        self.supervisor.failed().await
    }

    /// Aborts one service as a crash would (tests and drills); false when
    /// no service has that name.
    pub fn crash(&self, service: &str) -> bool {
        self.supervisor.crash(service)
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
    use backon::Retryable;
    (|| options.clone().connect(addrs.clone()))
        .retry(
            backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(50))
                .with_max_delay(Duration::from_millis(500))
                .with_total_delay(Some(CONNECT_PATIENCE)),
        )
        .notify(|e, _| tracing::debug!(error = %e, "connecting to NATS failed; trying again"))
        .await
        .map_err(|e| fail(e.to_string()))
}

/// Errors of a JetStream that is still coming up (a cluster electing its
/// leader or waiting for its peers) or reloading its accounts (no one answers
/// the API for a moment), as opposed to a refused configuration.
fn jetstream_forming(error: &str) -> bool {
    [
        "no suitable peers",
        "temporarily unavailable",
        "timed out",
        "no responders",
        // async-nats's words for no responders to a JetStream API request
        "requested JetStream resource does not exist",
    ]
    .iter()
    .any(|s| error.contains(s))
}

/// Runs a start-up step again while JetStream is briefly away (for up to
/// 30 s), giving up at once on any other error.
async fn patiently<T, E, F, Fut>(what: &str, step: F) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    use backon::Retryable;
    step.retry(
        backon::ConstantBuilder::default()
            .with_delay(Duration::from_millis(500))
            .with_max_times(60),
    )
    .when(|e| jetstream_forming(&e.to_string()))
    .notify(|e, _| tracing::warn!(error = %e, "JetStream not ready for {what} yet; trying again"))
    .await
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

/// A service's error as the supervisor records it.
fn failed(e: impl std::fmt::Display) -> String {
    e.to_string()
}

pub async fn start(cfg: ServerConfig) -> Result<Running, StartError> {
    if let Some(smtp) = &cfg.webhooks.smtp {
        smtp.mailer().map_err(StartError::Smtp)?;
    }
    let client = connect_nats(&cfg.nats_url, "unidesk-server").await?;
    let store = EventStore::new(client, cfg.js_domain.as_deref().filter(|d| !d.is_empty()));
    // A cluster still forming has no peers for replicated streams yet, and a
    // JetStream just started, or reloading its accounts, can be briefly away.
    patiently("the streams", || store.ensure_streams(cfg.replicas))
        .await
        .map_err(|e| StartError::Streams(e.to_string()))?;
    let db = Db::connect(&cfg.database_url, "public", 16).await?;
    db.migrate().await?;
    let supervisor = Supervisor::default();
    let policy = cfg.restarts;
    if cfg.run_projectors {
        // Projectors get connections of their own (a held advisory lock and
        // a batch connection each), so a burst of API reads never starves
        // the read models of the writes that keep them current.
        let projector_db =
            Db::connect(&cfg.database_url, "public", 2 * streams::PROJECTED.len()).await?;
        for stream in streams::PROJECTED {
            let (db, js) = (projector_db.clone(), store.jetstream().clone());
            supervisor.spawn(&format!("projector:{stream}"), policy, move |_| {
                let projector = Projector::new(
                    db.clone(),
                    js.clone(),
                    stream,
                    ProjectorOptions::live(stream),
                );
                async move {
                    projector.run_forever().await;
                    Ok(())
                }
            });
        }
    }
    // What nodes and integrations send comes in on a connection of its own,
    // through the guard: the client would stop on some header blocks.
    let guarded = EventStore::new(
        connect_nats_with(&cfg.nats_url, "unidesk-server-input", true).await?,
        cfg.js_domain.as_deref().filter(|d| !d.is_empty()),
    );
    let pinned = ud_core::edge::ingest::Pinned::default();
    let secrets = match cfg.secrets.clone() {
        Some(key) => Some(
            patiently("the secrets bucket", || {
                ud_core::secrets::Secrets::open(store.clone(), key.clone())
            })
            .await
            .map_err(|e| StartError::Streams(e.to_string()))?,
        ),
        None => None,
    };
    let ttl = cfg
        .storage
        .as_ref()
        .map_or(std::time::Duration::from_secs(900), |s| {
            s.settings().url_ttl
        });
    let stores = ud_storage::Stores::new(cfg.storage.clone(), cfg.stores.clone(), ttl)?;
    let commands = patiently("the idempotency bucket", || {
        TaskCommands::new(store.clone())
    })
    .await?
    .with_secrets(secrets.clone())
    .with_stores(stores.clone());
    let (client, c) = (guarded.client().clone(), commands.clone());
    supervisor.spawn("command-service", policy, move |_| {
        let (client, c) = (client.clone(), c.clone());
        async move { ud_core::service::run(client, c).await.map_err(failed) }
    });
    let pipelines = ud_core::pipeline::commands::PipelineCommands::new(commands.clone());
    let (p, c, shared) = (pipelines.clone(), commands.clone(), stores.any());
    supervisor.spawn("pipeline-driver", policy, move |_| {
        let (p, c) = (p.clone(), c.clone());
        async move {
            ud_core::pipeline::driver::run(p, c, shared)
                .await
                .map_err(failed)
        }
    });
    let schedules =
        ud_core::schedule::commands::ScheduleCommands::new(commands.clone(), pipelines.clone());
    let s = schedules.clone();
    supervisor.spawn("schedules", policy, move |_| {
        let s = s.clone();
        async move { ud_core::schedule::runner::run(s).await.map_err(failed) }
    });
    let (s, hooks) = (store.clone(), cfg.webhooks.clone());
    supervisor.spawn("webhooks", policy, move |_| {
        let (s, hooks) = (s.clone(), hooks.clone());
        async move { ud_notify::deliver::run(s, hooks).await.map_err(failed) }
    });
    if let Some(edge) = &cfg.edge {
        if let Some(hub) = edge.hub.clone() {
            let s = store.clone();
            supervisor.spawn("hub-accounts", policy, move |_| {
                let (s, hub) = (s.clone(), hub.clone());
                async move { ud_core::edge::hub::run(s, hub).await.map_err(failed) }
            });
        }
        let ingest = ud_core::edge::ingest::Ingest::new(
            commands.clone(),
            edge.controller.cancel_grace_seconds,
        );
        let (reader, held) = (guarded.jetstream().clone(), pinned.clone());
        let handover = Policy {
            patience: ud_core::edge::ingest::HANDOVER + Duration::from_secs(5),
            ..policy
        };
        supervisor.spawn("ingest", handover, move |stop| {
            let (ingest, reader, held) = (ingest.clone(), reader.clone(), held.clone());
            async move {
                ud_core::edge::ingest::run(ingest, reader, held, stop)
                    .await
                    .map_err(failed)
            }
        });
        let sources = ud_core::edge::requests::Sources {
            store: guarded.clone(),
            credentials: edge.git_credentials.clone(),
            stores: stores.clone(),
            secrets: secrets.clone(),
        };
        supervisor.spawn("node-requests", policy, move |_| {
            let sources = sources.clone();
            async move {
                ud_core::edge::requests::serve(sources)
                    .await
                    .map_err(failed)
            }
        });
        let (c, settings) = (commands.clone(), edge.controller.clone());
        supervisor.spawn("scheduler", policy, move |_| {
            let (c, settings) = (c.clone(), settings.clone());
            async move {
                ud_core::edge::scheduler::run(c, settings).await;
                Ok(())
            }
        });
    }
    if stores.any() {
        let storage = stores.clone();
        let s = store.clone();
        supervisor.spawn("log-archiver", policy, move |_| {
            let (s, storage) = (s.clone(), storage.clone());
            async move { ud_core::archive::run(s, storage).await.map_err(failed) }
        });
    }
    if !cfg.disk.paths.is_empty() {
        let (js, disk) = (store.jetstream().clone(), cfg.disk.clone());
        supervisor.spawn("disk-watch", policy, move |_| {
            let (js, disk) = (js.clone(), disk.clone());
            async move {
                ud_gateway::health::watch_disks(js, disk).await;
                Ok(())
            }
        });
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
    let state = AppState::new(ud_gateway::Shared {
        commands,
        pipelines,
        schedules,
        db,
        projected,
        stores: stores.clone(),
        disk: cfg.disk.clone(),
        tokens: Default::default(),
        ingest_pinned: cfg.edge.is_some().then_some(pinned),
        services: supervisor.states(),
        tunnels: ud_tunnel::Tunnels::new(store.client().clone()),
        sessions: cfg.sessions.clone(),
        session_targets: Default::default(),
        email: cfg.webhooks.smtp.is_some(),
        oidc: cfg
            .oidc
            .clone()
            .map(ud_gateway::sso::Oidc::new)
            .transpose()?,
    });
    // The API owns its listener: when it ends, the process stops.
    let api = std::sync::Mutex::new(Some(listener));
    let api_state = state.clone();
    supervisor.spawn("api", Policy::fatal(), move |_| {
        let listener = api.lock().ok().and_then(|mut l| l.take());
        let state = api_state.clone();
        async move {
            match listener {
                Some(l) => ud_gateway::serve(l, state).await.map_err(failed),
                None => Err("its listener is gone".into()),
            }
        }
    });
    info!(%addr, "api listening");
    Ok(Running {
        addr,
        state,
        supervisor,
    })
}
