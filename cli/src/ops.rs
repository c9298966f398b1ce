//! Operator commands that talk to NATS and PostgreSQL directly.

use std::io::Write;

use anyhow::{bail, Context, Result};
use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use base64::Engine;
use clap::{Args, Subcommand};
use futures::StreamExt;
use serde_json::json;
use time::format_description::well_known::Rfc3339;
use ud_core::store::StoredEvent;
use ud_gateway::tasks::HistoryEvent;
use ud_projections::rebuild;
use ud_schemas::codec;

use crate::serve::{DbArgs, NatsArgs};

#[derive(Subcommand)]
pub enum EventsCommand {
    /// Follow events as the streams store them (from now on), decoded, one JSON object a line.
    Tail(TailArgs),
    /// Write the stored history of a stream, an aggregate or a time range as JSON lines, for audits.
    Export(ExportArgs),
}

#[derive(Args)]
pub struct TailArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// Subject with wildcards, e.g. `ud.task.*.failed` or `ud.>`.
    #[arg(long, default_value = "ud.>")]
    subject: String,
    /// Stop after this many events.
    #[arg(long)]
    count: Option<usize>,
    /// One JSON object per event (for scripts) instead of one line for people.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ExportArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// Stream to export.
    #[arg(long, default_value = "UD_TASKS")]
    stream: String,
    /// Only this task's events.
    #[arg(long, conflicts_with_all = ["node", "subject"])]
    task: Option<ud_schemas::TaskId>,
    /// Only this node's events (use --stream UD_NODES or UD_HEARTBEATS).
    #[arg(long, conflicts_with = "subject")]
    node: Option<ud_schemas::NodeId>,
    /// Only events on subjects matching this filter.
    #[arg(long)]
    subject: Option<String>,
    /// Events stored at or after this time (RFC 3339).
    #[arg(long)]
    since: Option<String>,
    /// Events stored before this time (RFC 3339).
    #[arg(long)]
    until: Option<String>,
    /// Output file (default: standard output).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

fn event_line(
    subject: &str,
    seq: Option<u64>,
    stored_at: &str,
    headers: Option<&async_nats::HeaderMap>,
    payload: &[u8],
) -> serde_json::Value {
    let raw = base64::engine::general_purpose::STANDARD.encode(payload);
    match codec::decode_message(subject, headers, payload) {
        Ok(envelope) => {
            let mut v = serde_json::to_value(HistoryEvent::from(StoredEvent {
                seq: seq.unwrap_or(0),
                subject: subject.to_owned(),
                stored_at: stored_at.to_owned(),
                envelope,
            }))
            .unwrap_or_default();
            if seq.is_none() {
                if let Some(o) = v.as_object_mut() {
                    o.remove("seq");
                    o.remove("stored_at");
                }
            }
            v["payload_cbor"] = json!(raw);
            v
        }
        Err(e) => {
            json!({"seq": seq, "subject": subject, "stored_at": stored_at, "decode_error": e.to_string(), "payload_cbor": raw})
        }
    }
}

fn parse_time(s: &str, flag: &str) -> Result<time::OffsetDateTime> {
    time::OffsetDateTime::parse(s, &Rfc3339)
        .with_context(|| format!("--{flag} {s:?} is not an RFC 3339 time"))
}

pub async fn events(c: EventsCommand) -> Result<()> {
    match c {
        EventsCommand::Tail(a) => tail(a).await,
        EventsCommand::Export(a) => export(a).await,
    }
}

/// Follows what the streams store from now on: a publish a stream refused
/// (the loser of two main-server instances racing) is never shown.
async fn tail(a: TailArgs) -> Result<()> {
    let store = a.nats.connect("unidesk-events-tail").await?;
    let mut feeds = Vec::new();
    for config in ud_schemas::streams::all(1) {
        let Ok(stream) = store.jetstream().get_stream(&config.name).await else {
            continue;
        };
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: a.subject.clone(),
                deliver_policy: DeliverPolicy::New,
                ..Default::default()
            })
            .await
            .with_context(|| format!("cannot follow {} in {}", a.subject, config.name))?;
        feeds.push(consumer.messages().await?);
    }
    if feeds.is_empty() {
        bail!("no UniDesk streams on this server: is the platform set up?");
    }
    eprintln!("following {}", a.subject);
    let mut messages = futures::stream::select_all(feeds);
    let mut seen = 0usize;
    let mut out = std::io::stdout().lock();
    while let Some(msg) = messages.next().await {
        let msg = msg?;
        let (seq, stored_at) = match msg.info() {
            Ok(i) => (
                Some(i.stream_sequence),
                i.published.format(&Rfc3339).unwrap_or_default(),
            ),
            Err(_) => (None, String::new()),
        };
        let line = event_line(
            msg.subject.as_str(),
            seq,
            &stored_at,
            msg.headers.as_ref(),
            &msg.payload,
        );
        if a.json {
            writeln!(out, "{line}")?;
        } else {
            writeln!(out, "{}", human_event(&line))?;
        }
        out.flush()?;
        seen += 1;
        if a.count.is_some_and(|c| seen >= c) {
            break;
        }
    }
    Ok(())
}

/// One event on one line for people: sequence, time, subject, actor and
/// the event's short fields.
fn human_event(v: &serde_json::Value) -> String {
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let data = &v["data"];
    let detail: Vec<String> = [
        "reason",
        "node_id",
        "attempt",
        "exit_code",
        "step",
        "mode",
        "name",
    ]
    .iter()
    .filter(|k| !data[**k].is_null())
    .map(|k| format!("{k}={}", s(&data[*k])))
    .collect();
    format!(
        "{:>8}  {}  {}  {}  {}",
        s(&v["seq"]),
        s(&v["stored_at"]),
        s(&v["subject"]),
        s(&v["actor"]),
        detail.join(" ")
    )
}

fn human_rebuild(r: &serde_json::Value) -> String {
    let events: u64 = r["streams"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["last_seq"].as_u64())
        .sum();
    let mut out = format!(
        "rebuilt schema {} from streams up to {events} events in {:.1} s\n",
        r["schema"].as_str().unwrap_or_default(),
        r["seconds"].as_f64().unwrap_or(0.0)
    );
    let rows: Vec<Vec<String>> = r["differences"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            vec![
                d["table"].as_str().unwrap_or_default().to_owned(),
                d["only_in_left"].to_string(),
                d["only_in_right"].to_string(),
            ]
        })
        .collect();
    out.push_str(&crate::output::table(
        &["TABLE", "ONLY REBUILT", "ONLY LIVE"],
        &rows,
    ));
    out.push_str(&format!(
        "equal to {}: {}\n",
        r["compared_with"].as_str().unwrap_or_default(),
        if r["equal"] == true { "yes" } else { "no" }
    ));
    out
}

async fn export(a: ExportArgs) -> Result<()> {
    let store = a.nats.connect("unidesk-events-export").await?;
    let filter = match (&a.task, &a.node, &a.subject) {
        (Some(t), _, _) => ud_schemas::subjects::task_all(t),
        (_, Some(n), _) => ud_schemas::subjects::node_all(n),
        (_, _, Some(s)) => s.clone(),
        _ => String::new(),
    };
    let since = a
        .since
        .as_deref()
        .map(|s| parse_time(s, "since"))
        .transpose()?;
    let until = a
        .until
        .as_deref()
        .map(|s| parse_time(s, "until"))
        .transpose()?;
    let mut stream = store
        .jetstream()
        .get_stream(&a.stream)
        .await
        .with_context(|| format!("no stream {}", a.stream))?;
    let last = stream.info().await?.state.last_sequence;
    let mut out: Box<dyn Write> = match &a.out {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let mut written = 0u64;
    if last > 0 {
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: filter,
                deliver_policy: since.map_or(DeliverPolicy::All, |t| DeliverPolicy::ByStartTime {
                    start_time: t,
                }),
                ..Default::default()
            })
            .await?;
        let pending = consumer.cached_info().num_pending;
        let mut messages = consumer.messages().await?;
        let mut remaining = pending;
        while remaining > 0 {
            let Some(msg) = messages.next().await else {
                break;
            };
            let msg = msg?;
            remaining -= 1;
            let info = msg.info().map_err(|e| anyhow::anyhow!("{e}"))?;
            let (seq, published) = (info.stream_sequence, info.published);
            if until.is_some_and(|u| published >= u) || seq > last {
                break;
            }
            let stored_at = published.format(&Rfc3339).unwrap_or_default();
            let line = event_line(
                msg.subject.as_str(),
                Some(seq),
                &stored_at,
                msg.headers.as_ref(),
                &msg.payload,
            );
            writeln!(out, "{line}")?;
            written += 1;
        }
    }
    out.flush()?;
    eprintln!("exported {written} events from {}", a.stream);
    Ok(())
}

#[derive(Subcommand)]
pub enum ProjectionsCommand {
    /// Replay every stream into an empty schema and compare it with the live
    /// tables as of one moment (up to the events they had projected then).
    Rebuild(RebuildArgs),
}

#[derive(Args)]
pub struct RebuildArgs {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    db: DbArgs,
    /// Schema to rebuild into (dropped and re-created).
    #[arg(long, default_value = "rebuild")]
    schema: String,
    /// Schema of the live read models to compare with.
    #[arg(long, default_value = "public")]
    compare_with: String,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn projections(c: ProjectionsCommand) -> Result<()> {
    match c {
        ProjectionsCommand::Rebuild(a) => {
            if a.schema == a.compare_with {
                bail!("--schema must differ from --compare-with: a rebuild drops its schema first");
            }
            let store = a.nats.connect("unidesk-rebuild").await?;
            let db = a.db.connect(&a.schema).await?;
            let started = std::time::Instant::now();
            // Compared with the live tables as of one moment, replayed up
            // to what they had projected then.
            let audit = rebuild::audit(&db, store.jetstream(), 5000, &a.compare_with).await?;
            let same = audit.equal();
            let report = json!({
                "schema": a.schema, "seconds": started.elapsed().as_secs_f64(),
                "streams": audit.streams, "compared_with": a.compare_with,
                "differences": audit.differences, "equal": same,
            });
            crate::output::either(a.json, &report, human_rebuild);
            if !same {
                bail!("the rebuilt read models differ from {}", a.compare_with);
            }
            Ok(())
        }
    }
}

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Issue an API token by writing its event directly (bootstrap); prints the secret once.
    IssueToken(IssueTokenArgs),
    /// Print the hub's initial accounts file (platform and system users, no nodes yet).
    HubAccounts(HubAccountsArgs),
    /// Print the hub's `leafnodes` block: TLS with DIR/hub.pem and
    /// DIR/hub.key when both exist, otherwise the port on loopback only.
    HubLeafnodes(HubLeafnodesArgs),
    /// Make the key project secrets are encrypted with (UD_SECRETS_KEY_FILE);
    /// an existing file is never replaced. Keep a copy apart from the
    /// backups: without it the secrets in a backup cannot be read.
    SecretKey(SecretKeyArgs),
}

#[derive(Args)]
pub struct SecretKeyArgs {
    /// The file to write (readable by its owner only).
    #[arg(long)]
    out: std::path::PathBuf,
}

#[derive(Args)]
pub struct HubLeafnodesArgs {
    /// Folder with the hub's certificate (chain) and key.
    #[arg(long)]
    tls_dir: std::path::PathBuf,
    #[arg(long, default_value_t = 7422)]
    port: u16,
}

#[derive(Args)]
pub struct HubAccountsArgs {
    #[arg(long, default_value = "platform")]
    platform_user: String,
    #[arg(long, env = "UD_PLATFORM_PASSWORD", hide_env_values = true)]
    platform_password: String,
    #[arg(long, default_value = "sys")]
    system_user: String,
    #[arg(long, env = "UD_HUB_SYSTEM_PASSWORD", hide_env_values = true)]
    system_password: String,
}

#[derive(Args)]
pub struct IssueTokenArgs {
    #[command(flatten)]
    nats: NatsArgs,
    #[arg(long)]
    name: String,
    #[arg(long = "project")]
    projects: Vec<String>,
    #[arg(long)]
    admin: bool,
}

pub async fn admin(c: AdminCommand) -> Result<()> {
    match c {
        AdminCommand::SecretKey(a) => {
            let key = ud_core::secrets::SecretKey::create(&a.out)?;
            println!("{} (key id {})", a.out.display(), key.id());
            Ok(())
        }
        AdminCommand::HubLeafnodes(a) => {
            let (cert, key) = (a.tls_dir.join("hub.pem"), a.tls_dir.join("hub.key"));
            let tls = (cert.is_file() && key.is_file()).then(|| {
                (
                    cert.to_string_lossy().into_owned(),
                    key.to_string_lossy().into_owned(),
                )
            });
            print!(
                "{}",
                ud_core::edge::hubconf::leafnodes_block(
                    a.port,
                    tls.as_ref().map(|(c, k)| (c.as_str(), k.as_str()))
                )
            );
            Ok(())
        }
        AdminCommand::HubAccounts(a) => {
            let hash =
                |p: &str| ud_core::edge::hubconf::hash_password(p).map_err(|e| anyhow::anyhow!(e));
            let system = ud_core::edge::hubconf::SystemUser {
                user: a.system_user,
                password_hash: hash(&a.system_password)?,
            };
            print!(
                "{}",
                ud_core::edge::hubconf::accounts_with_system(
                    &a.platform_user,
                    &hash(&a.platform_password)?,
                    &[],
                    Some(&system)
                )
            );
            Ok(())
        }
        AdminCommand::IssueToken(a) => {
            let store = a.nats.connect("unidesk-admin").await?;
            let mut notices = store
                .client()
                .subscribe(ud_schemas::subjects::projected(ud_schemas::streams::AUTH))
                .await?;
            let issued = ud_core::commands::issue_token(
                &store,
                &ud_core::commands::NewToken::scoped(&a.name, &a.projects, a.admin),
                "admin-cli",
            )
            .await
            .map_err(|e| anyhow::anyhow!(e.describe()))?;
            println!("{}", issued.secret);
            // Return once a running server's projector has it, so the token works at once.
            let projected = tokio::time::timeout(std::time::Duration::from_secs(10), async {
                while let Some(m) = notices.next().await {
                    let seq = std::str::from_utf8(&m.payload)
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok());
                    if seq.is_some_and(|s| s >= issued.seq) {
                        return true;
                    }
                }
                false
            })
            .await;
            if !matches!(projected, Ok(true)) {
                eprintln!(
                    "warning: no projector confirmed the token yet; is `unidesk serve` running?"
                );
            }
            Ok(())
        }
    }
}
