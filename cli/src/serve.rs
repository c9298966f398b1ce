//! `unidesk serve`: everything the main server runs, in one process.

use anyhow::{Context, Result};
use clap::Args;
use tracing::info;
use ud_core::EventStore;
use ud_gateway::server::{self, ServerConfig};
use ud_projections::Db;

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
        let client = server::connect_nats(&self.nats_url, name).await?;
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
            .context("cannot connect to PostgreSQL (UD_DATABASE_URL)")
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
    let running = server::start(ServerConfig {
        nats_url: args.nats.nats_url.clone(),
        js_domain: args.nats.js_domain.clone(),
        database_url: args.db.database_url.clone(),
        listen: args.listen.clone(),
        replicas: args.replicas,
        run_projectors: !args.no_projectors,
    })
    .await?;
    println!("UniDesk API listening on http://{}", running.addr);
    tokio::select! {
        _ = shutdown_signal() => info!("shutting down"),
        _ = running.wait() => anyhow::bail!("the API server stopped"),
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    } else {
        let _ = ctrl_c.await;
    }
}
