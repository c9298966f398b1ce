//! `unidesk`: the server, the client and the operator's tools in one binary.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod backup;
mod client;
mod files;
mod interactive;
mod ops;
mod output;
mod pipelines;
mod projects;
mod quotas;
mod schedules;
mod serve;
mod webhooks;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "unidesk",
    version,
    about = "UniDesk: distributed work on your own compute nodes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[allow(clippy::large_enum_variant)] // built once per command or event, never stored in bulk
#[derive(Subcommand)]
enum Command {
    /// Run the main-server services: command services, projectors, REST API.
    Serve(serve::ServeArgs),
    /// Submit a task.
    Submit(client::SubmitArgs),
    /// List tasks.
    List(client::ListArgs),
    /// Show one task.
    Show(client::IdArgs),
    /// A task's whole history, from the event stream.
    History(client::IdArgs),
    /// Cancel a task.
    Cancel(client::CancelArgs),
    /// Pipelines: steps that run once the steps they need have ended.
    #[command(subcommand)]
    Pipeline(pipelines::PipelineCommand),
    /// Schedules: a task or pipeline submitted at the times of a cron expression.
    #[command(subcommand)]
    Schedule(schedules::ScheduleCommand),
    /// Compute nodes.
    #[command(subcommand)]
    Node(client::NodeCommand),
    /// One task's output, rerun, priority.
    #[command(subcommand)]
    Task(client::TaskCommand),
    /// Interactive sessions: Jupyter, TensorBoard, a web app in a task.
    #[command(subcommand)]
    Session(interactive::SessionCommand),
    /// Whole queues.
    #[command(subcommand)]
    Queue(client::QueueCommand),
    /// Compute quotas per project, and what each project uses.
    #[command(subcommand)]
    Quota(quotas::QuotaCommand),
    /// Projects, their members and roles.
    #[command(subcommand)]
    Project(projects::ProjectCommand),
    /// A project's task events POSTed to a URL (Slack too), signed.
    #[command(subcommand)]
    Webhook(webhooks::WebhookCommand),
    /// API tokens.
    #[command(subcommand)]
    Token(client::TokenCommand),
    /// Project secrets that tasks get as environment variables.
    #[command(subcommand)]
    Secret(client::SecretCommand),
    /// A project's files in the object store.
    #[command(subcommand)]
    File(files::FileCommand),
    /// Follow or export events (talks to NATS directly).
    #[command(subcommand)]
    Events(ops::EventsCommand),
    /// Back up every stream and the read models into the backup directory (keeps the newest 7).
    Backup(backup::BackupArgs),
    /// Bring a backup back: streams with their sequences, then the read models.
    Restore(backup::RestoreArgs),
    /// Read-model maintenance.
    #[command(subcommand)]
    Projections(ops::ProjectionsCommand),
    /// Bootstrap operations that talk to NATS directly (no API token needed).
    #[command(subcommand)]
    Admin(ops::AdminCommand),
}

/// Every (long flag, environment variable) pair of the command and its subcommands.
fn env_names(cmd: &clap::Command) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = cmd
        .get_arguments()
        .filter_map(|a| {
            Some((
                a.get_long()?.to_owned(),
                a.get_env()?.to_string_lossy().into_owned(),
            ))
        })
        .collect();
    for sub in cmd.get_subcommands() {
        out.extend(env_names(sub));
    }
    out.sort();
    out.dedup();
    out
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("UD_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,tower_http=warn,async_nats=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // Settings usually come from the environment: name the variable too.
            let text = e.render().to_string();
            eprint!("{text}");
            for (flag, env) in env_names(&Cli::command()) {
                if text.contains(&format!("'--{flag} ")) || text.contains(&format!("--{flag} <")) {
                    eprintln!("note: --{flag} is the setting {env}");
                }
            }
            return std::process::ExitCode::from(2);
        }
    };
    let result: Result<()> = match cli.command {
        Command::Serve(a) => {
            init_tracing(a.log_json);
            serve::run(a).await
        }
        other => {
            init_tracing(false);
            match other {
                Command::Submit(a) => client::submit(a).await,
                Command::List(a) => client::list(a).await,
                Command::Show(a) => client::show(a).await,
                Command::History(a) => client::history(a).await,
                Command::Cancel(a) => client::cancel(a).await,
                Command::Pipeline(c) => pipelines::run(c).await,
                Command::Schedule(c) => schedules::run(c).await,
                Command::Node(c) => client::node(c).await,
                Command::Task(c) => client::task(c).await,
                Command::Session(c) => interactive::session(c).await,
                Command::Queue(c) => client::queue(c).await,
                Command::Quota(c) => quotas::run(c).await,
                Command::Project(c) => projects::run(c).await,
                Command::Webhook(c) => webhooks::run(c).await,
                Command::Token(c) => client::token(c).await,
                Command::Secret(c) => client::secret(c).await,
                Command::File(c) => files::run(c).await,
                Command::Events(c) => ops::events(c).await,
                Command::Projections(c) => ops::projections(c).await,
                Command::Backup(a) => backup::backup(a).await,
                Command::Restore(a) => backup::restore(a).await,
                Command::Admin(c) => ops::admin(c).await,
                Command::Serve(_) => Ok(()),
            }
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
