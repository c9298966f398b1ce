//! The main server's in-memory view of nodes and tasks, folded from the
//! streams with the domain's own `evolve`, for liveness and scheduling.

use std::collections::HashMap;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use tokio::sync::mpsc;
use tracing::warn;
use ud_schemas::codec::{self, EventEnvelope};
use ud_schemas::{Event, NodeId, TaskId};

use super::scheduler::quota::GpuTime;
use super::{nats_err, EdgeError};
use crate::follow::Next;
use crate::node::{self, Liveness, Node};
use crate::task::{self, Task};

#[derive(Clone, Debug)]
pub struct NodeEntry {
    pub node: Node,
    /// Sequence of its last event in `UD_NODES` (the concurrency check of liveness).
    pub seq: u64,
}

#[derive(Clone, Debug)]
pub struct TaskEntry {
    pub task: Task,
    pub seq: u64,
    /// Sequence at which it last became pending (submitted, lost, retried):
    /// its place in the queue, which notes such as `waiting` do not change.
    pub queued_at: u64,
}

#[derive(Default)]
pub struct Cluster {
    pub nodes: HashMap<NodeId, NodeEntry>,
    pub tasks: HashMap<TaskId, TaskEntry>,
    /// GPU time of runs per project and month, for GPU-hour quotas.
    pub gpu_time: GpuTime,
}

/// One decoded message from a followed stream.
pub struct Update {
    pub stream: String,
    pub seq: u64,
    pub envelope: EventEnvelope,
    /// False while catching up on history.
    pub live: bool,
}

impl Cluster {
    pub fn apply(&mut self, u: &Update) {
        match &u.envelope.event {
            Event::Node(id, e) => {
                let prev = self.nodes.remove(id);
                let seq = if u.stream == ud_schemas::streams::NODES {
                    u.seq
                } else {
                    prev.as_ref().map_or(0, |p| p.seq)
                };
                if let Some(node) = node::evolve(prev.map(|p| p.node), *id, e) {
                    self.nodes.insert(*id, NodeEntry { node, seq });
                }
            }
            Event::Task(id, e) => {
                let prev = self.tasks.remove(id);
                let (prev_state, prev_queued) = (
                    prev.as_ref().map(|p| p.task.state.clone()),
                    prev.as_ref().map(|p| p.queued_at),
                );
                if let Some(t) = task::evolve(prev.map(|p| p.task), *id, e) {
                    match e {
                        ud_schemas::TaskEvent::Started(s) => {
                            self.gpu_time
                                .start(*id, &t.project, t.spec.resources.gpus, s.at)
                        }
                        _ if t.state.live_node().is_none() => self.gpu_time.stop(*id, e.at()),
                        _ => {}
                    }
                    // Finished tasks hold no resources and need no decisions.
                    if !t.state.is_terminal() {
                        let was_pending = prev_state
                            .as_ref()
                            .is_some_and(|s| *s == task::TaskState::Pending);
                        let queued_at = match prev_queued {
                            Some(q) if was_pending && t.state == task::TaskState::Pending => q,
                            _ => u.seq,
                        };
                        self.tasks.insert(
                            *id,
                            TaskEntry {
                                task: t,
                                seq: u.seq,
                                queued_at,
                            },
                        );
                    }
                }
            }
            Event::Auth(..)
            | Event::Secret(..)
            | Event::Pipeline(..)
            | Event::Schedule(..)
            | Event::Project(..) => {}
        }
    }

    pub fn online(&self) -> impl Iterator<Item = &NodeEntry> {
        self.nodes
            .values()
            .filter(|n| n.node.liveness() == Liveness::Online)
    }
}

/// Follows `stream` from its first message, sending decoded updates; ends
/// when the receiver is dropped. Resumes where it was after a failure (hub
/// reloads drop ephemeral consumers).
pub async fn follow(
    js: jetstream::Context,
    stream: &str,
    tx: mpsc::Sender<Update>,
) -> Result<(), EdgeError> {
    let mut next = 1u64;
    let mut caught_up_at = None;
    loop {
        match follow_from(&js, stream, &tx, &mut next, &mut caught_up_at).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::debug!(stream, error = %e, "following again");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    }
}

async fn follow_from(
    js: &jetstream::Context,
    stream: &str,
    tx: &mpsc::Sender<Update>,
    next: &mut u64,
    caught_up_at: &mut Option<u64>,
) -> Result<(), EdgeError> {
    let mut s = js.get_stream(stream).await.map_err(nats_err)?;
    let last = s.info().await.map_err(nats_err)?.state.last_sequence;
    let caught_up_at = *caught_up_at.get_or_insert(last);
    let consumer = s
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: *next,
            },
            max_expires: ud_schemas::streams::PULL_EXPIRES,
            ..Default::default()
        })
        .await
        .map_err(nats_err)?;
    let mut messages = consumer.messages().await.map_err(nats_err)?;
    loop {
        // A consumer gone quiet with its server is bound again at once.
        let m = match crate::follow::next_or_stalled(&mut messages, &mut s, next.saturating_sub(1))
            .await
        {
            Next::Message(m) => *m,
            Next::Closed => break,
            Next::Stalled { read, last } => {
                return Err(EdgeError::Nats(
                    format!("{stream} consumer stalled at {read} of {last}").into(),
                ))
            }
            Next::Failed(e) => return Err(EdgeError::Nats(e)),
        };
        let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
        *next = seq + 1;
        match codec::decode_message(m.subject.as_str(), m.headers.as_ref(), &m.payload) {
            Ok(envelope) => {
                let update = Update {
                    stream: stream.to_owned(),
                    seq,
                    envelope,
                    live: seq > caught_up_at,
                };
                if tx.send(update).await.is_err() {
                    return Ok(());
                }
            }
            Err(e) => warn!(stream, seq, error = %e, "undecodable event ignored by the controller"),
        }
    }
    Err(EdgeError::Nats("consumer ended".into()))
}
