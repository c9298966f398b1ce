//! `ud-bench backbone`: the event backbone measured on real servers, each
//! platform figure printed beside the raw ceiling measured in the same run.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod backbone;
mod backup;
mod baseline;
mod cluster;
mod cpu;
mod edge;
mod fanout;
mod faults;
mod files;
mod lifecycle;
mod lost;
mod restart;
mod schedule;
mod shared;
mod sim;
mod stats;
mod tunnel;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "UniDesk benchmarks (real nats-server and PostgreSQL)")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Appends, projection, lag, REST submit-to-projected, replay.
    Backbone(backbone::Args),
    /// A real compute node: start latency, heartbeat ingest, offline detection.
    Edge(edge::Args),
    /// A hub restart with many nodes linked: time until every link is back.
    Restart(restart::Args),
    /// A steady load on a 3-server cluster while one server is killed.
    Cluster(cluster::Args),
    /// `unidesk backup` and `unidesk restore` of a million events.
    Backup(backup::Args),
    /// A large file through presigned URLs as the agent moves it, against a plain S3 client.
    Files(files::Args),
    /// A pipeline's /shared folder saved and put together, against a plain S3 client.
    Shared(shared::Args),
    /// A pipeline fanning out into many steps, against as many plain tasks.
    Fanout(fanout::Args),
    /// A session through the node's link against its container reached directly.
    Tunnel(tunnel::Args),
    /// The whole task lifecycle through REST, scheduler, simulated nodes and PostgreSQL.
    Lifecycle(lifecycle::Args),
    /// Placement and queue order over 1,000 nodes (pure functions).
    Schedule(schedule::Args),
    /// Tasks lost with a node that goes silent: how long marking them takes,
    /// and placement latency meanwhile.
    Lost(lost::Args),
    /// Faults at random under load on the whole local stack; one table of outcomes.
    Faults(faults::Args),
    /// (Used by `restart`: the simulated agents, as a child process.)
    #[command(hide = true)]
    Agents(restart::AgentsArgs),
}

#[tokio::main]
async fn main() -> Result<()> {
    // The platform's own log lines, when asked for with RUST_LOG (none by default).
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    match Cli::parse().bench {
        Bench::Backbone(a) => backbone::run(a).await,
        Bench::Edge(a) => edge::run(a).await,
        Bench::Restart(a) => restart::run(a).await,
        Bench::Schedule(a) => schedule::run_bench(a),
        Bench::Lifecycle(a) => lifecycle::run(a).await,
        Bench::Files(a) => files::run(a).await,
        Bench::Shared(a) => shared::run(a).await,
        Bench::Fanout(a) => fanout::run(a).await,
        Bench::Tunnel(a) => tunnel::run(a).await,
        Bench::Backup(a) => backup::run_bench(a).await,
        Bench::Cluster(a) => cluster::run(a).await,
        Bench::Lost(a) => lost::run(a).await,
        Bench::Faults(a) => faults::run(a).await,
        Bench::Agents(a) => restart::agents(a).await,
    }
}
