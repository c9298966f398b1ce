//! What nodes ask the main server, request/reply over their leaf link, each
//! on a subject only that node may publish on and answered only to its own
//! inbox (`_INBOX.<node hex>.…`, which no one else may subscribe to):
//!
//! * `ud.git.credentials.<node_id>`: a repository's credentials for one fetch
//!   (see [`super::credentials`]);
//! * `ud.assignment.<node_id>`: whether an assignment is still current,
//!   asked before a run starts, so that a stale dispatch is never run;
//! * `ud.storage.<node_id>`: presigned URLs for a task's inputs, outputs and
//!   checkpoint (see [`super::files`]);
//! * `ud.secrets.<node_id>`: the values of the project secrets a task names,
//!   for the node's current attempt only (see [`crate::secrets`]).
//!
//! Several main-server instances share the work through a queue group.

use bytes::Bytes;
use futures::StreamExt;
use tracing::{info, warn, Instrument};
use ud_schemas::dispatch::{
    self, AssignmentCheck, AssignmentReply, GitCredentialsReply, GitCredentialsRequest,
    SecretValue, SecretsReply, SecretsRequest, StorageReply, StorageRequest,
};
use ud_schemas::{edge, NodeId};

use super::credentials::GitCredentials;
use super::{nats_err, EdgeError};
use crate::secrets::Secrets;
use crate::task::{Task, TaskState};
use crate::EventStore;

const QUEUE: &str = "unidesk-node-requests";

/// Whether `node` may still start `check`'s run, given the task as stored (pure).
pub fn assignment_answer(
    node: &NodeId,
    task: Option<&Task>,
    check: &AssignmentCheck,
) -> AssignmentReply {
    let not = |reason: String| AssignmentReply {
        current: false,
        reason: Some(reason),
    };
    let Some(task) = task else {
        return not("no such task".into());
    };
    match &task.state {
        TaskState::Assigned { node_id, attempt }
        | TaskState::Running { node_id, attempt }
        | TaskState::Disconnected {
            node_id, attempt, ..
        } if node_id == node && *attempt == check.attempt => AssignmentReply {
            current: true,
            reason: None,
        },
        TaskState::Cancelling {
            node_id,
            attempt,
            reason,
        } if node_id == node && *attempt == check.attempt => {
            not(format!("cancel requested: {reason}"))
        }
        s if s.is_terminal() => not(format!("the task is {}", s.name())),
        _ => not(format!(
            "attempt {} on this node is no longer the task's assignment",
            check.attempt
        )),
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Credentials,
    Assignment,
    Storage,
    Secrets,
}

/// What a node's request is answered from.
#[derive(Clone)]
pub struct Sources {
    pub store: EventStore,
    pub credentials: GitCredentials,
    pub stores: ud_storage::Stores,
    pub secrets: Option<Secrets>,
}

/// The values of the secrets `task` names, for `node`'s `attempt` of it.
async fn secrets_answer(
    secrets: Option<&Secrets>,
    node: &NodeId,
    task: Option<&Task>,
    req: &SecretsRequest,
) -> SecretsReply {
    let denied = |reason: String| SecretsReply::Denied { reason };
    let check = AssignmentCheck {
        task_id: req.task_id,
        attempt: req.attempt,
    };
    let current = assignment_answer(node, task, &check);
    let (Some(task), true) = (task, current.current) else {
        return denied(
            current
                .reason
                .unwrap_or_else(|| "not this node's run".into()),
        );
    };
    let Some(secrets) = secrets else {
        return denied("this platform holds no key for secrets (UD_SECRETS_KEY_FILE)".into());
    };
    match secrets.values(&task.project, &task.spec.secrets).await {
        Ok(values) => SecretsReply::Values {
            values: values
                .into_iter()
                .map(|(name, value)| SecretValue {
                    name,
                    value: value.as_str().to_owned(),
                })
                .collect(),
        },
        Err(e) => denied(e.to_string()),
    }
}

/// The node a request came from, if it is to be answered.
pub(crate) fn requester(m: &async_nats::Message) -> Option<(NodeId, async_nats::Subject)> {
    let reply = m.reply.clone()?;
    let node: NodeId = m.subject.rsplit('.').next()?.parse().ok()?;
    if !reply.starts_with(&format!("{}.", edge::inbox_prefix(&node))) {
        warn!(node_id = %node, subject = %m.subject, "request with a foreign reply subject dropped");
        return None;
    }
    Some((node, reply))
}

async fn answer(
    from: &Sources,
    kind: Kind,
    node: NodeId,
    payload: &[u8],
) -> Result<Vec<u8>, EdgeError> {
    let (store, creds, stores) = (&from.store, &from.credentials, &from.stores);
    let codec = EdgeError::Codec;
    match kind {
        Kind::Credentials => {
            let reply = match dispatch::from_cbor::<GitCredentialsRequest>(
                payload,
                "git-credentials-request",
            ) {
                Ok(req) => {
                    let task = store.load_task(&req.task_id).await?.map(|(t, _)| t);
                    let reply = creds.answer(&node, task.as_ref(), &req);
                    let kind = match &reply {
                        GitCredentialsReply::None => "none",
                        GitCredentialsReply::Token { .. } => "token",
                        GitCredentialsReply::Ssh { .. } => "ssh",
                        GitCredentialsReply::Denied { .. } => "denied",
                    };
                    info!(task_id = %req.task_id, kind, "repository credentials requested");
                    reply
                }
                Err(e) => GitCredentialsReply::Denied {
                    reason: format!("undecodable request: {e}"),
                },
            };
            dispatch::to_cbor(&reply).map_err(codec)
        }
        Kind::Assignment => {
            let reply = match dispatch::from_cbor::<AssignmentCheck>(payload, "assignment-check") {
                Ok(check) => {
                    let task = store.load_task(&check.task_id).await?.map(|(t, _)| t);
                    let reply = assignment_answer(&node, task.as_ref(), &check);
                    if let Some(reason) = &reply.reason {
                        warn!(task_id = %check.task_id, attempt = check.attempt, reason = %reason, "stale dispatch refused");
                    }
                    reply
                }
                Err(e) => AssignmentReply {
                    current: false,
                    reason: Some(format!("undecodable request: {e}")),
                },
            };
            dispatch::to_cbor(&reply).map_err(codec)
        }
        Kind::Secrets => {
            let reply = match dispatch::from_cbor::<SecretsRequest>(payload, "secrets-request") {
                Ok(req) => {
                    let task = store.load_task(&req.task_id).await?.map(|(t, _)| t);
                    let reply =
                        secrets_answer(from.secrets.as_ref(), &node, task.as_ref(), &req).await;
                    match &reply {
                        SecretsReply::Values { values } => {
                            info!(task_id = %req.task_id, count = values.len(), "secrets handed out")
                        }
                        SecretsReply::Denied { reason } => {
                            warn!(task_id = %req.task_id, reason = %reason, "secrets refused")
                        }
                    }
                    reply
                }
                Err(e) => SecretsReply::Denied {
                    reason: format!("undecodable request: {e}"),
                },
            };
            dispatch::to_cbor(&reply).map_err(codec)
        }
        Kind::Storage => {
            let reply = match dispatch::from_cbor::<StorageRequest>(payload, "storage-request") {
                Ok(req) => super::files::answer(store, stores, &node, req).await,
                Err(e) => StorageReply::Refused {
                    reason: format!("undecodable request: {e}"),
                },
            };
            if let StorageReply::Refused { reason } = &reply {
                warn!(reason = %reason, "file transfer refused");
            }
            dispatch::to_cbor(&reply).map_err(codec)
        }
    }
}

/// Answers nodes' requests until the connection ends.
pub async fn serve(from: Sources) -> Result<(), EdgeError> {
    let client = from.store.client().clone();
    let subscribe = |prefix: &'static str| {
        let client = client.clone();
        async move {
            client
                .queue_subscribe(format!("{prefix}.*"), QUEUE.into())
                .await
                .map_err(nats_err)
        }
    };
    let mut credentials = subscribe(edge::GIT_CREDENTIALS_PREFIX).await?;
    let mut assignments = subscribe(edge::ASSIGNMENT_PREFIX).await?;
    let mut transfers = subscribe(edge::STORAGE_PREFIX).await?;
    let mut secrets = subscribe(edge::SECRETS_PREFIX).await?;
    info!(
        credential_hosts = from.credentials.len(),
        secrets = from.secrets.is_some(),
        "answering node requests"
    );
    loop {
        let (m, kind) = tokio::select! {
            Some(m) = credentials.next() => (m, Kind::Credentials),
            Some(m) = assignments.next() => (m, Kind::Assignment),
            Some(m) = transfers.next() => (m, Kind::Storage),
            Some(m) = secrets.next() => (m, Kind::Secrets),
            else => break,
        };
        let Some((node, reply_to)) = requester(&m) else {
            continue;
        };
        let (from, client) = (from.clone(), client.clone());
        let span = tracing::info_span!("node_request", node_id = %node);
        tokio::spawn(
            async move {
                match answer(&from, kind, node, &m.payload).await {
                    Ok(bytes) => {
                        if let Err(e) = client.publish(reply_to, Bytes::from(bytes)).await {
                            warn!(error = %e, "reply not sent");
                        }
                    }
                    // No reply: the node times out and goes on as if the hub were away.
                    Err(e) => warn!(error = %e, "cannot answer"),
                }
            }
            .instrument(span),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(state: TaskState) -> Task {
        let (project, spec) = crate::validate::submit_task(&crate::validate::tests::request())
            .unwrap_or_else(|e| panic!("{e:?}"));
        Task {
            id: ud_schemas::TaskId::new(),
            project,
            spec,
            state,
            attempts: 1,
            not_before: None,
            gpus: Vec::new(),
            last_node: None,
            version: 2,
        }
    }

    #[test]
    fn only_the_current_assignment_may_start() {
        let (a, b) = (NodeId::new(), NodeId::new());
        let check = AssignmentCheck {
            task_id: ud_schemas::TaskId::new(),
            attempt: 1,
        };
        let current = |t: &Task, n: &NodeId| assignment_answer(n, Some(t), &check).current;
        assert!(current(
            &task(TaskState::Assigned {
                node_id: a,
                attempt: 1
            }),
            &a
        ));
        assert!(current(
            &task(TaskState::Running {
                node_id: a,
                attempt: 1
            }),
            &a
        ));
        assert!(!current(
            &task(TaskState::Assigned {
                node_id: a,
                attempt: 1
            }),
            &b
        ));
        assert!(!current(
            &task(TaskState::Assigned {
                node_id: a,
                attempt: 2
            }),
            &a
        ));
        assert!(!current(
            &task(TaskState::Cancelling {
                node_id: a,
                attempt: 1,
                reason: "user".into()
            }),
            &a
        ));
        assert!(!current(&task(TaskState::Pending), &a));
        assert!(!current(&task(TaskState::Succeeded { exit_code: 0 }), &a));
        assert!(!assignment_answer(&a, None, &check).current);
        assert!(assignment_answer(&a, None, &check).reason.is_some());
    }
}
