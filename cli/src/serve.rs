//! `unidesk serve`: everything the main server runs, in one process.

use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use tracing::info;
use ud_core::{EventStore, TaskCommands};
use ud_gateway::{AppState, Projected};
use ud_projections::{Db, Projector, ProjectorOptions};
use ud_schemas::streams;

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
        let client = async_nats::ConnectOptions::new()
            .name(name)
            .connect(&self.nats_url)
            .await
            .with_context(|| format!("cannot connect to NATS at {}", self.nats_url))?;
        Ok(EventStore::new(client, self.js_domain.as_deref().filter(|d| !d.is_empty())))
    }
}

#[derive(Args, Clone)]
pub struct DbArgs {
    /// PostgreSQL URL of the read models.
    #[arg(long, env = "UD_DATABASE_URL")]
    pub database_url: String,
}

impl DbArgs {
    pub async fn connect(&self, schema: &str) -> Result<Db> {
        Db::connect(&self.database_url, schema, 16)
            .await
            .with_context(|| "cannot connect to PostgreSQL (UD_DATABASE_URL)".to_string())
    }
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub db: DbArgs,
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
}

pub async fn run(args: ServeArgs) -> Result<()> {
    let store = args.nats.connect("unidesk-server").await?;
    store.ensure_streams(args.replicas).await.context("cannot create the streams")?;
    let db = args.db.connect("public").await?;
    db.migrate().await.context("migrations failed")?;
    if !args.no_projectors {
        for stream in streams::PROJECTED {
            let projector = Arc::new(Projector::new(
                db.clone(),
                store.jetstream().clone(),
                stream,
                ProjectorOptions::default(),
            ));
            tokio::spawn(async move { projector.run_forever().await });
        }
    }
    let commands = TaskCommands::new(store.clone()).await?;
    let service_client = store.client().clone();
    let service_commands = commands.clone();
    tokio::spawn(async move {
        if let Err(e) = ud_core::service::run(service_client, service_commands).await {
            tracing::error!(error = %e, "command service stopped");
        }
    });
    let projected = Projected::start(store.client(), &db).await?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    info!(%addr, "api listening");
    println!("UniDesk API listening on http://{addr}");
    let state = AppState { commands, db, projected };
    tokio::select! {
        r = ud_gateway::serve(listener, state) => r.context("api server failed")?,
        _ = shutdown_signal() => info!("shutting down"),
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
            return;
        }
    }
    let _ = ctrl_c.await;
}
