//! `unidesk serve`: everything the main server runs, in one process.

use anyhow::{Context, Result};
use clap::Args;
use tracing::info;
use ud_core::EventStore;
use ud_projections::Db;
use ud_server::{self as server, ServerConfig};

#[derive(Args, Clone)]
pub struct NatsArgs {
    /// NATS server URL of the hub.
    #[arg(long, env = "UD_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// JetStream domain to address (leave empty on the hub itself).
    #[arg(long, env = "UD_JS_DOMAIN")]
    pub js_domain: Option<String>,
}

impl NatsArgs {
    pub async fn connect(&self, name: &str) -> Result<EventStore> {
        self.connect_with(name, false).await
    }

    /// Connects through [`ud_core::guard`], for reading what nodes wrote.
    pub async fn connect_guarded(&self, name: &str) -> Result<EventStore> {
        self.connect_with(name, true).await
    }

    async fn connect_with(&self, name: &str, guarded: bool) -> Result<EventStore> {
        let client = server::connect_nats_with(&self.nats_url, name, guarded).await?;
        Ok(EventStore::new(
            client,
            self.js_domain.as_deref().filter(|d| !d.is_empty()),
        ))
    }
}

#[derive(Args, Clone)]
pub struct DbArgs {
    /// PostgreSQL URL of the read models (required).
    #[arg(long, env = "UD_DATABASE_URL")]
    database_url: Option<String>,
}

impl DbArgs {
    /// The URL, or an error naming the setting.
    pub fn url(&self) -> Result<&str> {
        self.database_url
            .as_deref()
            .filter(|u| !u.is_empty())
            .context("UD_DATABASE_URL (or --database-url) is required: the PostgreSQL URL of the read models")
    }

    pub async fn connect(&self, schema: &str) -> Result<Db> {
        Db::connect(self.url()?, schema, 16)
            .await
            .context("cannot connect to PostgreSQL (UD_DATABASE_URL)")
    }
}

/// The object store (any S3-compatible service).
#[derive(Args, Clone)]
pub struct StorageArgs {
    /// S3 endpoint URL (Garage, MinIO, ...); leave unset for AWS S3.
    #[arg(long = "s3-endpoint", env = "UD_S3_ENDPOINT")]
    pub endpoint: Option<String>,
    /// The store's address in the presigned URLs nodes and users get, when
    /// it differs from UD_S3_ENDPOINT (a proxy on the public host that keeps
    /// the Host header); unset: UD_S3_ENDPOINT.
    #[arg(long = "s3-public-endpoint", env = "UD_S3_PUBLIC_ENDPOINT")]
    pub public_endpoint: Option<String>,
    #[arg(long = "s3-region", env = "UD_S3_REGION", default_value = "us-east-1")]
    pub region: String,
    /// Bucket for project files, task outputs and log archives; unset: no object store.
    #[arg(long = "s3-bucket", env = "UD_S3_BUCKET")]
    pub bucket: Option<String>,
    #[arg(long = "s3-access-key-id", env = "UD_S3_ACCESS_KEY_ID")]
    pub access_key_id: Option<String>,
    #[arg(
        long = "s3-secret-access-key",
        env = "UD_S3_SECRET_ACCESS_KEY",
        hide_env_values = true
    )]
    pub secret_access_key: Option<String>,
    /// Address buckets by path (`<endpoint>/<bucket>`), as Garage and MinIO expect; false for virtual hosts.
    #[arg(long = "s3-path-style", env = "UD_S3_PATH_STYLE", default_value_t = true, action = clap::ArgAction::Set)]
    pub path_style: bool,
    /// Longest life of a presigned URL.
    #[arg(
        long = "s3-url-ttl-seconds",
        env = "UD_S3_URL_TTL_SECONDS",
        default_value_t = 900
    )]
    pub url_ttl_seconds: u64,
    /// Most MiB one project may keep in the object store (unset: no limit).
    #[arg(long = "project-quota-mb", env = "UD_PROJECT_QUOTA_MB")]
    pub project_quota_mb: Option<u64>,
    /// A JSON file of projects' own object stores (docs/pipelines.md,
    /// "Stores per project"); those projects keep their files there.
    #[arg(long = "stores-file", env = "UD_STORES_FILE")]
    pub stores_file: Option<std::path::PathBuf>,
}

impl StorageArgs {
    /// The projects' own stores, as the stores file gives them.
    pub fn stores(&self) -> Result<ud_storage::StoresConfig> {
        let Some(path) = self
            .stores_file
            .as_ref()
            .filter(|p| !p.as_os_str().is_empty())
        else {
            return Ok(Default::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("UD_STORES_FILE: cannot read {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("UD_STORES_FILE: {} is not a stores file", path.display()))
    }
}

impl StorageArgs {
    /// The store, or `None` when no bucket is set.
    pub fn storage(&self) -> Result<Option<ud_storage::Storage>> {
        let Some(bucket) = self.bucket.clone().filter(|b| !b.is_empty()) else {
            return Ok(None);
        };
        let access_key_id = self
            .access_key_id
            .clone()
            .filter(|k| !k.is_empty())
            .context("UD_S3_BUCKET is set but UD_S3_ACCESS_KEY_ID is not")?;
        let secret_access_key = self
            .secret_access_key
            .clone()
            .filter(|k| !k.is_empty())
            .context("UD_S3_BUCKET is set but UD_S3_SECRET_ACCESS_KEY is not")?;
        for (name, e) in [
            ("UD_S3_ENDPOINT", &self.endpoint),
            ("UD_S3_PUBLIC_ENDPOINT", &self.public_endpoint),
        ] {
            if let Some(e) = e.as_ref().filter(|e| !e.is_empty()) {
                if !(e.starts_with("http://") || e.starts_with("https://")) {
                    anyhow::bail!("{name} must be an http:// or https:// URL, not {e:?}");
                }
            }
        }
        let settings = ud_storage::StorageSettings {
            endpoint: self.endpoint.clone().filter(|e| !e.is_empty()),
            public_endpoint: self.public_endpoint.clone().filter(|e| !e.is_empty()),
            region: self.region.clone(),
            bucket,
            access_key_id,
            secret_access_key,
            path_style: self.path_style,
            url_ttl: std::time::Duration::from_secs(self.url_ttl_seconds),
            project_quota_bytes: self
                .project_quota_mb
                .map(|mb| mb.saturating_mul(1024 * 1024)),
        };
        Ok(Some(
            ud_storage::Storage::new(settings).context("UD_S3_* settings")?,
        ))
    }
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Address of the REST API.
    #[arg(long, env = "UD_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Replicas of each stream (3 on a JetStream cluster).
    #[arg(long, env = "UD_STREAM_REPLICAS", default_value_t = 1)]
    pub replicas: usize,
    /// Run without the projectors (when other instances run them).
    #[arg(long, env = "UD_NO_PROJECTORS")]
    pub no_projectors: bool,
    /// Log as JSON lines.
    #[arg(long, env = "UD_LOG_JSON")]
    pub log_json: bool,
    /// Run without compute-node services (ingest, liveness, scheduling).
    #[arg(long, env = "UD_NO_EDGE")]
    pub no_edge: bool,
    /// The hub's accounts file to keep in step with enrolled nodes (needs credentials in UD_NATS_URL).
    #[arg(long, env = "UD_HUB_ACCOUNTS_FILE")]
    pub hub_accounts_file: Option<std::path::PathBuf>,
    /// The hub's PID file, to reload it after the accounts file changed.
    #[arg(long, env = "UD_HUB_PID_FILE")]
    pub hub_pid_file: Option<std::path::PathBuf>,
    /// The hub's system-account user, used to close a revoked node's link.
    #[arg(long, env = "UD_HUB_SYSTEM_USER", default_value = "sys")]
    pub hub_system_user: String,
    #[arg(long, env = "UD_HUB_SYSTEM_PASSWORD", hide_env_values = true)]
    pub hub_system_password: Option<String>,
    /// A node silent this long is offline.
    #[arg(long, env = "UD_HEARTBEAT_TIMEOUT_SECONDS", default_value_t = 90.0)]
    pub heartbeat_timeout_seconds: f64,
    /// Seconds between a cancel's graceful signal and the kill.
    #[arg(long, env = "UD_CANCEL_GRACE_SECONDS", default_value_t = 10)]
    pub cancel_grace_seconds: u32,
    /// Seconds a run whose node went offline stays `disconnected`, waiting
    /// for it, before its task is lost and placed anew (a task's own
    /// `lost_after_seconds` wins; 0: lost at once).
    #[arg(long, env = "UD_LOST_AFTER_SECONDS", default_value_t = 600)]
    pub lost_after_seconds: u64,
    /// The longest grace a task or queue may ask for (longer ones are cut to it).
    #[arg(long, env = "UD_MAX_LOST_AFTER_SECONDS", default_value_t = 604_800)]
    pub max_lost_after_seconds: u64,
    /// How tasks choose among the nodes they fit on: pack (fullest first) or spread (emptiest first).
    #[arg(long, env = "UD_PLACEMENT", default_value = "pack")]
    pub placement: ud_core::edge::scheduler::Placement,
    /// JSON file of queue priorities and limits: {"queues": {"gpu": {"priority": 10, "max_running": 4}}}.
    #[arg(long, env = "UD_QUEUES_FILE")]
    pub queues_file: Option<std::path::PathBuf>,
    /// The main server's own disks to watch, comma-separated (JetStream store, PostgreSQL data, backups).
    #[arg(long, env = "UD_DISK_WATCH", value_delimiter = ',')]
    pub disk_watch: Vec<std::path::PathBuf>,
    /// Below this many free MiB on a watched disk, /readyz is down and the alert metric is 1.
    #[arg(long, env = "UD_DISK_MIN_FREE_MB", default_value_t = 5120)]
    pub disk_min_free_mb: u64,
    /// Tries of one webhook delivery, the first included (1 s apart, then
    /// doubling up to a minute).
    #[arg(long, env = "UD_WEBHOOK_TRIES", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=50))]
    pub webhook_tries: u16,
    /// Let webhooks reach loopback, private and link-local addresses (the
    /// platform's own network); off, such deliveries fail saying so.
    #[arg(long, env = "UD_WEBHOOK_PRIVATE")]
    pub webhook_private: bool,
    /// The SMTP server e-mail webhooks are sent through:
    /// smtp://[user:password@]host[:port][?tls=required] or smtps://...
    /// Unset: no e-mail webhooks.
    #[arg(long, env = "UD_SMTP_URL")]
    pub smtp_url: Option<String>,
    /// Sign in through this OpenID Connect provider (its issuer URL); with
    /// UD_OIDC_CLIENT_ID, UD_OIDC_CLIENT_SECRET_FILE and UD_OIDC_REDIRECT_URL.
    #[arg(long, env = "UD_OIDC_ISSUER", requires_all = ["oidc_client_id", "oidc_client_secret_file", "oidc_redirect_url"])]
    pub oidc_issuer: Option<String>,
    /// This platform's client id at the provider.
    #[arg(long, env = "UD_OIDC_CLIENT_ID")]
    pub oidc_client_id: Option<String>,
    /// A file holding the client secret.
    #[arg(long, env = "UD_OIDC_CLIENT_SECRET_FILE")]
    pub oidc_client_secret_file: Option<std::path::PathBuf>,
    /// This gateway's /auth/callback as browsers reach it, e.g.
    /// https://unidesk.lab.example.org/auth/callback (registered at the provider).
    #[arg(long, env = "UD_OIDC_REDIRECT_URL")]
    pub oidc_redirect_url: Option<String>,
    /// The ID token claim naming the UniDesk user: email, preferred_username or sub.
    #[arg(long, env = "UD_OIDC_USER_CLAIM", default_value = "email")]
    pub oidc_user_claim: ud_gateway::sso::UserClaim,
    /// Days a token issued at sign-in works.
    #[arg(long, env = "UD_OIDC_TOKEN_DAYS", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=365))]
    pub oidc_token_days: u32,
    /// The sender of e-mail webhooks.
    #[arg(
        long,
        env = "UD_SMTP_FROM",
        default_value = "UniDesk <unidesk@localhost>"
    )]
    pub smtp_from: String,
    /// JSON file of repository credentials per host, handed to nodes for their fetches only.
    #[arg(long, env = "UD_GIT_CREDENTIALS_FILE")]
    pub git_credentials_file: Option<std::path::PathBuf>,
    /// The key project secrets are encrypted with (64 hex digits; make one
    /// with `unidesk admin secret-key`). Without it tasks cannot name secrets.
    #[arg(long, env = "UD_SECRETS_KEY_FILE")]
    pub secrets_key_file: Option<std::path::PathBuf>,
    /// Sessions at hosts of their own: `https://{id}.s.example.org` (a
    /// wildcard DNS name and certificate at the HTTPS entry); without it,
    /// sessions are served under `/s/<id>/` of the platform's origin.
    #[arg(long, env = "UD_SESSION_ORIGIN")]
    pub session_origin: Option<String>,
    /// The key session links and cookies are signed with (64 hex digits,
    /// the same file on every main server; `unidesk admin secret-key`
    /// makes one). Without it, a key of this process.
    #[arg(long, env = "UD_SESSION_KEY_FILE")]
    pub session_key_file: Option<std::path::PathBuf>,
}

fn session_settings(args: &ServeArgs) -> Result<ud_gateway::sessions::SessionSettings> {
    let key = match &args.session_key_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).context("UD_SESSION_KEY_FILE")?;
            let mut key = [0u8; 32];
            hex::decode_to_slice(text.trim(), &mut key)
                .map_err(|_| anyhow::anyhow!("UD_SESSION_KEY_FILE must hold 64 hex digits"))?;
            Some(key)
        }
        None => None,
    };
    ud_gateway::sessions::SessionSettings::new(args.session_origin.as_deref(), key)
        .map_err(|e| anyhow::anyhow!(e))
}

fn edge_config(args: &ServeArgs) -> Result<Option<server::EdgeConfig>> {
    if args.no_edge {
        return Ok(None);
    }
    if !(0.001..=1_000_000.0).contains(&args.heartbeat_timeout_seconds) {
        anyhow::bail!(
            "UD_HEARTBEAT_TIMEOUT_SECONDS must be between 0.001 and 1000000, not {}",
            args.heartbeat_timeout_seconds
        );
    }
    let hub = match &args.hub_accounts_file {
        None => None,
        Some(file) => {
            let url: async_nats::ServerAddr = args.nats.nats_url.parse().context("UD_NATS_URL")?;
            let (Some(user), Some(password)) = (url.username(), url.password()) else {
                anyhow::bail!("UD_HUB_ACCOUNTS_FILE needs the platform's credentials in UD_NATS_URL (nats://user:password@host:port)");
            };
            Some(ud_core::edge::hub::HubSettings {
                accounts_file: file.clone(),
                pid_file: args.hub_pid_file.clone(),
                platform_user: user.to_owned(),
                platform_password: password.to_owned(),
                system_user: args
                    .hub_system_password
                    .clone()
                    .map(|p| (args.hub_system_user.clone(), p)),
                hub_addr: format!("{}:{}", url.host(), url.port()),
                replicas: args.replicas,
            })
        }
    };
    let git_credentials = match &args.git_credentials_file {
        Some(path) => ud_core::edge::credentials::GitCredentials::load(path)
            .context("UD_GIT_CREDENTIALS_FILE")?,
        None => Default::default(),
    };
    let queues = match &args.queues_file {
        Some(path) => ud_core::edge::scheduler::Queues::load(path).context("UD_QUEUES_FILE")?,
        None => Default::default(),
    };
    let timeout = std::time::Duration::from_secs_f64(args.heartbeat_timeout_seconds);
    Ok(Some(server::EdgeConfig {
        hub,
        controller: ud_core::edge::scheduler::ControllerSettings {
            heartbeat_timeout: timeout,
            check_interval: (timeout / 90).max(std::time::Duration::from_millis(100)),
            cancel_grace_seconds: args.cancel_grace_seconds,
            placement: args.placement,
            queues,
            lost_after: std::time::Duration::from_secs(args.lost_after_seconds),
            max_lost_after: std::time::Duration::from_secs(args.max_lost_after_seconds),
        },
        git_credentials,
    }))
}

pub async fn run(args: ServeArgs) -> Result<()> {
    let running = server::start(ServerConfig {
        nats_url: args.nats.nats_url.clone(),
        js_domain: args.nats.js_domain.clone(),
        database_url: args.db.url()?.to_owned(),
        listen: args.listen.clone(),
        replicas: args.replicas,
        run_projectors: !args.no_projectors,
        edge: edge_config(&args)?,
        storage: args.storage.storage()?,
        stores: args.storage.stores()?,
        disk: ud_gateway::health::DiskWatch {
            paths: args.disk_watch.clone(),
            min_free_mb: args.disk_min_free_mb,
        },
        restarts: Default::default(),
        secrets: args
            .secrets_key_file
            .as_deref()
            .map(ud_core::secrets::SecretKey::load)
            .transpose()
            .context("UD_SECRETS_KEY_FILE")?,
        sessions: session_settings(&args)?,
        webhooks: ud_notify::deliver::Settings {
            tries: usize::from(args.webhook_tries),
            allow_private: args.webhook_private,
            smtp: args.smtp_url.clone().map(|url| ud_notify::deliver::Smtp {
                url,
                from: args.smtp_from.clone(),
            }),
            ..Default::default()
        },
        oidc: oidc_settings(&args)?,
    })
    .await?;
    println!("UniDesk API listening on http://{}", running.addr);
    let mut running = running;
    let fatal = tokio::select! {
        _ = shutdown_signal() => None,
        fatal = running.wait() => Some(fatal),
    };
    match fatal {
        None => {
            info!("shutting down");
            running.stop().await;
            Ok(())
        }
        Some(fatal) => {
            tracing::error!(service = %fatal.service, reason = %fatal.reason, "stopping: a service keeps failing");
            running.stop().await;
            Err(fatal.into())
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    } else {
        let _ = ctrl_c.await;
    }
}

/// Sign-in through an OpenID Connect provider, when its issuer is set.
fn oidc_settings(args: &ServeArgs) -> Result<Option<ud_gateway::sso::OidcSettings>> {
    let Some(issuer) = args.oidc_issuer.clone() else {
        return Ok(None);
    };
    let secret_file = args
        .oidc_client_secret_file
        .as_ref()
        .context("UD_OIDC_CLIENT_SECRET_FILE is needed with UD_OIDC_ISSUER")?;
    let client_secret = std::fs::read_to_string(secret_file)
        .with_context(|| format!("UD_OIDC_CLIENT_SECRET_FILE {}", secret_file.display()))?
        .trim()
        .to_owned();
    Ok(Some(ud_gateway::sso::OidcSettings {
        issuer,
        client_id: args
            .oidc_client_id
            .clone()
            .context("UD_OIDC_CLIENT_ID is needed with UD_OIDC_ISSUER")?,
        client_secret,
        redirect_url: args
            .oidc_redirect_url
            .clone()
            .context("UD_OIDC_REDIRECT_URL is needed with UD_OIDC_ISSUER")?,
        user_claim: args.oidc_user_claim,
        token_days: args.oidc_token_days,
    }))
}
