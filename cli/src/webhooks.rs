//! `unidesk webhook`: a project's task events POSTed to a URL, signed.

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::client::{Api, ApiArgs};
use crate::output;

#[derive(Subcommand)]
pub enum WebhookCommand {
    /// Make a webhook; prints the key of its signatures once.
    Create(CreateArgs),
    /// A project's webhooks.
    Ls(ProjectArgs),
    /// Stop delivering to a webhook.
    Delete(NameArgs),
    /// A webhook's deliveries of the last 7 days, newest first.
    Deliveries(NameArgs),
}

#[derive(Args)]
pub struct CreateArgs {
    #[command(flatten)]
    api: ApiArgs,
    project: String,
    name: String,
    /// Where deliveries are POSTed (http or https).
    #[arg(long, required_unless_present = "emails")]
    url: Option<String>,
    /// Mail deliveries to this address instead (repeat; the main server's
    /// SMTP server sends them).
    #[arg(long = "email", conflicts_with_all = ["url", "slack"])]
    emails: Vec<String>,
    /// An event type to deliver (repeat): task.succeeded, task.failed,
    /// task.timed_out, task.cancelled, task.lost, task.retrying,
    /// node.offline, quota.reached.
    #[arg(long = "event", required = true)]
    events: Vec<String>,
    /// Send `{"text": ...}` for a Slack-compatible incoming webhook.
    #[arg(long)]
    slack: bool,
}

#[derive(Args)]
pub struct ProjectArgs {
    #[command(flatten)]
    api: ApiArgs,
    project: String,
}

#[derive(Args)]
pub struct NameArgs {
    #[command(flatten)]
    api: ApiArgs,
    project: String,
    name: String,
}

fn hooks(list: &Value) -> String {
    let rows: Vec<Vec<String>> = list
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            let events: Vec<&str> = w["events"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            vec![
                w["name"].as_str().unwrap_or_default().to_owned(),
                w["format"].as_str().unwrap_or_default().to_owned(),
                events.join(","),
                w["url"].as_str().unwrap_or_default().to_owned(),
            ]
        })
        .collect();
    output::table(&["NAME", "FORMAT", "EVENTS", "URL"], &rows)
}

fn deliveries(list: &Value) -> String {
    let rows: Vec<Vec<String>> = list
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            let s = |k: &str| match &d[k] {
                Value::Null => "-".to_owned(),
                Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            vec![
                s("at"),
                s("event_type"),
                s("task_id"),
                s("outcome"),
                s("attempts"),
                s("status"),
                s("error"),
            ]
        })
        .collect();
    output::table(
        &["AT", "EVENT", "TASK", "OUTCOME", "TRIES", "STATUS", "ERROR"],
        &rows,
    )
}

pub async fn run(c: WebhookCommand) -> Result<()> {
    match c {
        WebhookCommand::Create(a) => {
            let (url, format) = match a.url {
                Some(url) => (url, if a.slack { "slack" } else { "json" }),
                None => (format!("mailto:{}", a.emails.join(",")), "email"),
            };
            let body = json!({"name": a.name, "url": url, "events": a.events, "format": format});
            let as_json = a.api.json;
            let v = Api::new(a.api)
                .post(&format!("/api/v1/projects/{}/webhooks", a.project), &body)
                .await?;
            output::either(as_json, &v, |v| {
                format!(
                    "webhook {} made; its signing key (shown once): {}\n",
                    v["name"].as_str().unwrap_or_default(),
                    v["secret"].as_str().unwrap_or_default()
                )
            });
        }
        WebhookCommand::Ls(a) => {
            let as_json = a.api.json;
            let v = Api::new(a.api)
                .get(&format!("/api/v1/projects/{}/webhooks", a.project))
                .await?;
            output::either(as_json, &v, hooks);
        }
        WebhookCommand::Delete(a) => {
            Api::new(a.api)
                .delete(&format!(
                    "/api/v1/projects/{}/webhooks/{}",
                    a.project, a.name
                ))
                .await?;
        }
        WebhookCommand::Deliveries(a) => {
            let as_json = a.api.json;
            let v = Api::new(a.api)
                .get(&format!(
                    "/api/v1/projects/{}/webhooks/{}/deliveries",
                    a.project, a.name
                ))
                .await?;
            output::either(as_json, &v, deliveries);
        }
    }
    Ok(())
}
