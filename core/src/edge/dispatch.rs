//! Messages to one node, built in one place: the run of an attempt and the
//! cancel of a task (stream `UD_DISPATCH`, subjects
//! `ud.dispatch.<node_id>.<task_id>.<kind>`).

use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use ud_schemas::dispatch::{self, DispatchCancel, DispatchRun};
use ud_schemas::{edge, now_millis, CodecError, NodeId, TaskId};

/// A message for a node: its subject and what to publish.
pub type Outgoing = (String, PublishMessage);

fn message(id: String, payload: Vec<u8>) -> PublishMessage {
    PublishMessage::build()
        .message_id(id.as_str())
        .header("Content-Type", "application/cbor")
        .payload(Bytes::from(payload))
}

/// The run of `attempt` of `task` on `node`, with the GPU devices it gets.
/// Its message id is the attempt's, so a run sent again is stored once.
pub fn run(
    node: &NodeId,
    task: &crate::task::Task,
    fence_after_seconds: Option<u64>,
) -> Result<Outgoing, CodecError> {
    let (attempt, task_id) = (task.attempts, task.id);
    let run = DispatchRun {
        at: now_millis(),
        task_id,
        attempt,
        spec: task.spec.clone(),
        gpus: task.gpus.clone(),
        fence_after_seconds,
        project: Some(task.project.to_string()),
    };
    let task = task_id;
    Ok((
        edge::dispatch_subject(node, &task, "run"),
        message(format!("run-{task}-{attempt}"), dispatch::to_cbor(&run)?),
    ))
}

/// Stops `task`'s run on `node`: the graceful signal, then the kill after
/// `grace_seconds`.
pub fn cancel(
    node: &NodeId,
    task: TaskId,
    attempt: Option<u32>,
    reason: &str,
    grace_seconds: u32,
) -> Result<Outgoing, CodecError> {
    let at = now_millis();
    let cancel = DispatchCancel {
        at,
        task_id: task,
        reason: reason.to_owned(),
        grace_seconds,
        attempt,
    };
    Ok((
        edge::dispatch_subject(node, &task, "cancel"),
        message(format!("cancel-{task}-{at}"), dispatch::to_cbor(&cancel)?),
    ))
}
