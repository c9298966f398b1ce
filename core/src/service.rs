//! Task commands as a NATS micro service (`unidesk-tasks`), so integrations
//! can do over NATS what they can do over HTTP. `nats micro ls` lists it.
//!
//! | subject | request (JSON) | reply (JSON) |
//! | --- | --- | --- |
//! | `ud.cmd.task.submit` | `{"task": SubmitTask, "idempotency_key"?: str, "actor"?: str}` | `{"task_id", "seq", "created"}` |
//! | `ud.cmd.task.cancel` | `{"task_id": str, "reason"?: str, "actor"?: str}` | `{"task_id", "seq", "created"}` |
//!
//! Errors carry `Nats-Service-Error-Code` (the HTTP status of the same
//! error) and `Nats-Service-Error` (the reason, naming fields). Who may send
//! commands is governed by NATS permissions on `ud.cmd.>`.

use async_nats::service::{self, ServiceExt};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tracing::warn;
use ud_schemas::TaskId;

use crate::commands::{Accepted, CommandError, TaskCommands};
use crate::validate::SubmitTask;

pub const SERVICE_NAME: &str = "unidesk-tasks";
pub const GROUP: &str = "ud.cmd.task";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    pub task: SubmitTask,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub actor: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    pub task_id: TaskId,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub actor: Option<String>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct Reply {
    pub task_id: TaskId,
    pub seq: u64,
    pub created: bool,
}

fn reply(result: Result<Accepted, CommandError>) -> Result<Bytes, service::error::Error> {
    match result {
        Ok(a) => serde_json::to_vec(&Reply {
            task_id: a.task_id,
            seq: a.seq,
            created: a.created,
        })
        .map(Bytes::from)
        .map_err(|e| service::error::Error {
            status: e.to_string(),
            code: 500,
        }),
        Err(e) => Err(service::error::Error {
            // The reason goes into a header: a line break in it (a field
            // name from the request) would end the header.
            status: ud_schemas::headers::one_line(e.describe()),
            code: e.status_code().into(),
        }),
    }
}

/// The actor a request names ("nats" when it names none): printable text,
/// as it goes into every event's `Ud-Actor` header.
fn actor(named: Option<String>) -> Result<String, CommandError> {
    match named {
        None => Ok("nats".into()),
        Some(a) if a.is_empty() || !crate::validate::plain_text(&a, 200) => {
            Err(CommandError::Invalid(vec![
                crate::validate::FieldError::new(
                    "actor",
                    "must be 1-200 bytes of text without control characters",
                ),
            ]))
        }
        Some(a) => Ok(a),
    }
}

fn bad_json(e: serde_json::Error) -> CommandError {
    CommandError::Invalid(vec![crate::validate::FieldError::new(
        "body",
        e.to_string(),
    )])
}

async fn handle_submit(commands: TaskCommands, req: service::Request) {
    let result = match serde_json::from_slice::<SubmitRequest>(&req.message.payload) {
        Ok(r) => match actor(r.actor) {
            Ok(actor) => {
                commands
                    .submit(&r.task, r.idempotency_key.as_deref(), &actor, |_| true)
                    .await
            }
            Err(e) => Err(e),
        },
        Err(e) => Err(bad_json(e)),
    };
    if let Err(e) = req.respond(reply(result)).await {
        warn!(error = %e, "cannot reply to submit");
    }
}

async fn handle_cancel(commands: TaskCommands, req: service::Request) {
    let result = match serde_json::from_slice::<CancelRequest>(&req.message.payload) {
        Ok(r) => match actor(r.actor) {
            Ok(actor) => {
                let reason = r.reason.unwrap_or_else(|| format!("cancelled by {actor}"));
                commands.cancel(r.task_id, &reason, &actor, |_| true).await
            }
            Err(e) => Err(e),
        },
        Err(e) => Err(bad_json(e)),
    };
    if let Err(e) = req.respond(reply(result)).await {
        warn!(error = %e, "cannot reply to cancel");
    }
}

/// Serves the task commands until the connection closes.
pub async fn run(
    client: async_nats::Client,
    commands: TaskCommands,
) -> Result<(), async_nats::Error> {
    let service = client
        .service_builder()
        .description("UniDesk task commands")
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await?;
    let group = service.group(GROUP);
    let mut submit = group.endpoint("submit").await?;
    let mut cancel = group.endpoint("cancel").await?;
    loop {
        tokio::select! {
            Some(req) = submit.next() => { tokio::spawn(handle_submit(commands.clone(), req)); }
            Some(req) = cancel.next() => { tokio::spawn(handle_cancel(commands.clone(), req)); }
            else => break,
        }
    }
    Ok(())
}
