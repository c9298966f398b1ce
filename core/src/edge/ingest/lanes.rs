//! The ingest's lanes: each worker takes what waits for it, handles runs of
//! heartbeats together, runs of task reports task by task (tasks in
//! parallel, each task's in order), and anything else one by one.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use backon::{ExponentialBuilder, Retryable};
use tokio::sync::mpsc;
use tracing::{debug, warn};
use ud_schemas::codec::EventMeta;
use ud_schemas::report::Report;
use ud_schemas::{headers, now_millis, NodeId, TaskId};

use super::translate::{self, Translated};
use super::{origin, Ingest, Rejected};
use crate::aggregate::{Against, ExecuteError, Retries};
use crate::commands::CommandError;
use crate::node::NodeError;
use crate::task::{TaskCommand, TaskError, TaskState};

/// Most messages waiting at once that a worker takes together.
pub const BATCH: usize = 512;

/// How long the heartbeat lane waits for more heartbeats once it has one.
pub const HEARTBEAT_LINGER: Duration = Duration::from_millis(50);

/// What became of a message.
pub(super) enum Outcome {
    Done,
    Dropped(Rejected),
    /// Not handled now (the store is away, a race was lost): try again.
    Retry(String),
}

/// Takes what waits in `rx` (and, with a linger, what comes within it) into `batch`.
async fn take(
    rx: &mut mpsc::UnboundedReceiver<jetstream::Message>,
    batch: &mut Vec<jetstream::Message>,
    linger: Duration,
) {
    let deadline = tokio::time::Instant::now() + linger;
    while batch.len() < BATCH {
        match rx.try_recv() {
            Ok(m) => batch.push(m),
            Err(_) if linger.is_zero() => break,
            Err(_) => match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(m)) => batch.push(m),
                _ => break,
            },
        }
    }
}

pub(super) async fn worker(
    ingest: Ingest,
    mut rx: mpsc::UnboundedReceiver<jetstream::Message>,
    linger: Duration,
) {
    let held = Held::default();
    let held = &held;
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        take(&mut rx, &mut batch, linger).await;
        let mut rest = batch.as_slice();
        while let Some(first) = rest.first() {
            let beats = rest
                .iter()
                .take_while(|m| Report::is_heartbeat(&m.subject))
                .count();
            let runs = rest
                .iter()
                .take_while(|m| Report::task_of(&m.subject).is_some())
                .count();
            if beats >= 2 {
                heartbeats(&ingest, &rest[..beats], held).await;
                rest = &rest[beats..];
            } else if runs >= 2 {
                by_task(&ingest, &rest[..runs], held).await;
                rest = &rest[runs..];
            } else {
                one(&ingest, first, held).await;
                rest = &rest[1..];
            }
        }
        batch.clear();
    }
}

/// Messages about several tasks: each task's in order, the tasks in parallel
/// (what costs is the round trips to the stream, not the work).
async fn by_task(ingest: &Ingest, msgs: &[jetstream::Message], held: &Held) {
    let mut order: Vec<&str> = Vec::new();
    let mut groups: HashMap<&str, Vec<&jetstream::Message>> = HashMap::new();
    for m in msgs {
        let key = Report::task_of(&m.subject).unwrap_or_default();
        let group = groups.entry(key).or_default();
        if group.is_empty() {
            order.push(key);
        }
        group.push(m);
    }
    let runs = order
        .into_iter()
        .filter_map(|k| groups.remove(k))
        .map(|group| async move {
            for m in group {
                one(ingest, m, held).await;
            }
        });
    futures::future::join_all(runs).await;
}

/// Heartbeats appended together, many in flight; anything that is not a
/// plain heartbeat of a known node takes the one-by-one path.
async fn heartbeats(ingest: &Ingest, msgs: &[jetstream::Message], held: &Held) {
    let mut items = Vec::with_capacity(msgs.len());
    let mut ready = Vec::with_capacity(msgs.len());
    for m in msgs {
        match heartbeat(ingest, m).await {
            Ok(item) => {
                items.push(item);
                ready.push(m);
            }
            Err(Outcome::Dropped(why)) => {
                warn!(subject = %m.subject, reason = %why, "node report dropped");
                let _ = m.ack().await;
            }
            Err(_) => one(ingest, m, held).await,
        }
    }
    let mut outcomes = Vec::new();
    ingest
        .nodes
        .execute_each(items, BATCH, Retries(0), |i, result| match result {
            Ok(_) => {
                if let Some(m) = ready.get(i) {
                    outcomes.push((*m, true));
                }
            }
            Err(_) => {
                if let Some(m) = ready.get(i) {
                    outcomes.push((*m, false));
                }
            }
        })
        .await;
    for (m, stored) in outcomes {
        if stored {
            let _ = m.ack().await;
        } else {
            one(ingest, m, held).await;
        }
    }
}

/// A heartbeat ready to append against the node as last known.
async fn heartbeat(
    ingest: &Ingest,
    msg: &jetstream::Message,
) -> Result<Against<crate::node::Node>, Outcome> {
    let node = origin::sender(msg).map_err(Outcome::Dropped)?;
    let (_, report) = Report::decode(&msg.subject, msg.headers.as_ref(), &msg.payload)
        .map_err(|e| Outcome::Dropped(Rejected::Report(e)))?;
    let Ok(Translated::Node(command)) = translate::command(
        node,
        report,
        now_millis(),
        ud_schemas::report::attempt_of(msg.headers.as_ref()),
    ) else {
        return Err(Outcome::Retry("not a heartbeat".into()));
    };
    let current = ingest
        .nodes
        .current(&node)
        .await
        .map_err(|e| Outcome::Retry(e.to_string()))?;
    let Some((state, seq)) = current else {
        return Err(Outcome::Dropped(Rejected::Node(NodeError::Unknown)));
    };
    Ok(Against {
        id: node,
        state: Some(state),
        seq,
        command,
        meta: meta(node, msg),
    })
}

fn meta(node: NodeId, msg: &jetstream::Message) -> EventMeta {
    EventMeta {
        actor: format!("node:{node}"),
        ..headers::meta(msg.headers.as_ref())
    }
}

/// How long a task's later reports wait for one that went back for
/// redelivery before they are handled without it (it never came back:
/// the stream lost it, another instance took it).
const HOLD_AT_MOST: Duration = Duration::from_secs(30);

/// Tasks with a report that could not be handled and went back for
/// redelivery (the hub restarting, the store away): the task's later
/// reports go back after it until it has been handled, so that a task's
/// reports are applied in the order its node sent them. (Handled on, the
/// outcome that came after a start sent back would be stored first, and
/// the start, come again, refused: a run that succeeded without starting.)
#[derive(Default)]
pub(super) struct Held(std::sync::Mutex<HashMap<String, (u64, tokio::time::Instant)>>);

impl Held {
    /// Whether the report at `seq` of `task` must wait for an earlier one.
    fn waits(&self, task: &str, seq: u64, now: tokio::time::Instant) -> bool {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match held.get(task) {
            Some((_, since)) if now.duration_since(*since) >= HOLD_AT_MOST => {
                held.remove(task);
                false
            }
            Some((first, _)) => seq > *first,
            None => false,
        }
    }

    /// The report at `seq` of `task` went back for redelivery.
    fn hold(&self, task: &str, seq: u64, now: tokio::time::Instant) {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let entry = held.entry(task.to_owned()).or_insert((seq, now));
        *entry = (entry.0.min(seq), now);
    }

    /// The report at `seq` of `task` has been handled.
    fn release(&self, task: &str, seq: u64) {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if held.get(task).is_some_and(|(first, _)| *first == seq) {
            held.remove(task);
        }
    }
}

/// Handles one message, trying again a few times, briefly, before asking
/// for redelivery; a task's reports after one that went back go back too.
pub(super) async fn one(ingest: &Ingest, msg: &jetstream::Message, held: &Held) {
    let task = Report::task_of(&msg.subject);
    let seq = msg.info().map_or(0, |i| i.stream_sequence);
    if let Some(task) = task {
        if held.waits(task, seq, tokio::time::Instant::now()) {
            debug!(subject = %msg.subject, "waits for an earlier report of its task");
            let _ = msg.ack_with(AckKind::Nak(Some(REDELIVER_AFTER))).await;
            return;
        }
    }
    let attempt = || async {
        match handle(ingest, msg).await {
            Outcome::Retry(why) => Err(why),
            other => Ok(other),
        }
    };
    let result = attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(5))
                .with_max_delay(Duration::from_millis(200))
                .with_max_times(5)
                .with_jitter(),
        )
        .notify(|why, _| debug!(subject = %msg.subject, reason = %why, "retrying"))
        .await;
    match (&result, task) {
        (Ok(_), Some(task)) => held.release(task, seq),
        (Err(_), Some(task)) => held.hold(task, seq, tokio::time::Instant::now()),
        (_, None) => {}
    }
    match result {
        Ok(Outcome::Dropped(why)) => {
            warn!(subject = %msg.subject, reason = %why, "node report dropped");
            let _ = msg.ack().await;
        }
        Ok(_) => {
            debug!(subject = %msg.subject, "ingested");
            let _ = msg.ack().await;
        }
        Err(why) => {
            warn!(subject = %msg.subject, reason = %why, "ingest failed; redelivery later");
            let _ = msg.ack_with(AckKind::Nak(Some(REDELIVER_AFTER))).await;
        }
    }
}

/// When a report sent back for redelivery comes again.
const REDELIVER_AFTER: Duration = Duration::from_secs(1);

async fn handle(ingest: &Ingest, msg: &jetstream::Message) -> Outcome {
    let node = match origin::sender(msg) {
        Ok(node) => node,
        Err(why) => return Outcome::Dropped(why),
    };
    let report = match Report::decode(&msg.subject, msg.headers.as_ref(), &msg.payload) {
        Ok((_, report)) => report,
        Err(e) => return Outcome::Dropped(Rejected::Report(e)),
    };
    match translate::command(
        node,
        report,
        now_millis(),
        ud_schemas::report::attempt_of(msg.headers.as_ref()),
    ) {
        Err(why) => Outcome::Dropped(why),
        Ok(Translated::Log(task)) => log(ingest, node, task, msg).await,
        Ok(Translated::Node(command)) => {
            match ingest
                .nodes
                .execute(node, command, &meta(node, msg), Retries(0), |_| true)
                .await
            {
                Ok(_) => Outcome::Done,
                Err(ExecuteError::Rejected(e)) => Outcome::Dropped(Rejected::Node(e)),
                Err(e) => Outcome::Retry(e.to_string()),
            }
        }
        Ok(Translated::Run(task, command)) => run(ingest, node, task, command).await,
    }
}

/// Output of a task this node runs (or ran), passed on as it came.
async fn log(ingest: &Ingest, node: NodeId, task: TaskId, msg: &jetstream::Message) -> Outcome {
    let tasks = ingest.commands.tasks();
    let mine = |t: &crate::task::Task| t.state.live_node() == Some(node) || t.state.is_terminal();
    // The remembered state first; what it refuses is checked on the stream's.
    let known = match tasks.current(&task).await {
        Ok(Some((t, _))) if mine(&t) => true,
        Ok(_) => match tasks.load(&task).await {
            Ok(t) => t.is_some_and(|(t, _)| mine(&t)),
            Err(e) => return Outcome::Retry(e.to_string()),
        },
        Err(e) => return Outcome::Retry(e.to_string()),
    };
    if !known {
        return Outcome::Dropped(Rejected::Refused(format!(
            "log for task {task} not assigned to this node"
        )));
    }
    let mut headers = async_nats::HeaderMap::new();
    if let Some(id) = log_id(msg.headers.as_ref(), &msg.payload) {
        headers.insert("Nats-Msg-Id", id.as_str());
    }
    let js = ingest.commands.store().jetstream();
    match js
        .publish_with_headers(
            ud_schemas::subjects::log(&task),
            headers,
            msg.payload.clone(),
        )
        .await
    {
        Ok(ack) => match ack.await {
            Ok(_) => Outcome::Done,
            Err(e) => Outcome::Retry(e.to_string()),
        },
        Err(e) => Outcome::Retry(e.to_string()),
    }
}

/// The id a log chunk is stored under in `UD_LOGS`, so that the stream
/// keeps it once however often it comes: the node's own, or its place in
/// the node's stream and its bytes. A chunk comes again when the ingest
/// dies before its acknowledgement, or when the hub, killed, had not yet
/// stored that it had sourced it and sources it anew.
fn log_id(headers: Option<&async_nats::HeaderMap>, payload: &[u8]) -> Option<String> {
    if let Some(id) = headers.and_then(|h| h.get("Nats-Msg-Id")) {
        return Some(id.as_str().to_owned());
    }
    let (stream, seq) = origin::position(headers)?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(payload, &mut h);
    Some(format!(
        "log-{stream}-{seq}-{:016x}",
        std::hash::Hasher::finish(&h)
    ))
}

/// A report on a run: the task decides what it means.
async fn run(ingest: &Ingest, node: NodeId, task: TaskId, command: TaskCommand) -> Outcome {
    let start_of = match &command {
        TaskCommand::Start { attempt, .. } => Some(*attempt),
        _ => None,
    };
    let actor = format!("node:{node}");
    match ingest
        .commands
        .execute(task, command, &actor, |_| true)
        .await
    {
        Ok(_) => Outcome::Done,
        Err(CommandError::Conflict) => Outcome::Retry("task changed concurrently".into()),
        Err(e @ (CommandError::Unavailable(_) | CommandError::Idempotency(_))) => {
            Outcome::Retry(e.to_string())
        }
        Err(CommandError::Rejected(
            TaskError::WrongNode(_) | TaskError::InvalidTransition { .. },
        )) if start_of.is_some() => {
            // The same start again (its first append was stored but not
            // confirmed, so it came back): nothing to do.
            if let Ok(Some((t, _))) = ingest.commands.tasks().load(&task).await {
                let same = matches!(
                    t.state,
                    TaskState::Running { node_id: n, attempt: a }
                        | TaskState::Disconnected { node_id: n, attempt: a, running: true, .. }
                        | TaskState::Cancelling { node_id: n, attempt: a, .. }
                        if n == node && Some(a) == start_of
                );
                if same {
                    return Outcome::Done;
                }
            }
            // A stale dispatch: stop that run (that attempt only: a later
            // one may have been placed on the same node meanwhile).
            if let Some(attempt) = start_of {
                ingest.stop(node, task, attempt, "stale assignment").await;
            }
            Outcome::Dropped(Rejected::Refused(format!("stale start of task {task}")))
        }
        Err(e) => Outcome::Dropped(Rejected::Refused(format!("task {task}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sourced(position: &str) -> async_nats::HeaderMap {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Stream-Source", position);
        h
    }

    #[test]
    fn a_tasks_later_reports_wait_for_one_sent_back() {
        let held = Held::default();
        let now = tokio::time::Instant::now();
        assert!(!held.waits("t", 5, now), "nothing held, nothing waits");
        held.hold("t", 5, now);
        assert!(held.waits("t", 6, now), "a later report of the task waits");
        assert!(!held.waits("u", 6, now), "another task's does not");
        assert!(
            !held.waits("t", 5, now),
            "the one sent back is handled when it comes"
        );
        // A later one that also went back does not move the hold forward.
        held.hold("t", 7, now);
        assert!(held.waits("t", 6, now));
        held.release("t", 6);
        assert!(
            held.waits("t", 6, now),
            "only the first held releases the task"
        );
        held.release("t", 5);
        assert!(!held.waits("t", 7, now), "handled, the task goes on");
        // One that never comes back holds its task for a bounded time.
        held.hold("t", 9, now);
        assert!(!held.waits("t", 10, now + HOLD_AT_MOST));
        assert!(!held.waits("t", 10, now), "an expired hold is gone");
    }

    #[test]
    fn a_log_chunk_that_comes_again_has_the_same_id() {
        let first = log_id(Some(&sourced("EDGE_ab12 7 > >")), b"chunk");
        assert!(first.is_some());
        assert_eq!(first, log_id(Some(&sourced("EDGE_ab12 7 > >")), b"chunk"));
        // Another place in the stream, or other bytes at the same place
        // (a stream made anew), is another chunk.
        assert_ne!(first, log_id(Some(&sourced("EDGE_ab12 8 > >")), b"chunk"));
        assert_ne!(first, log_id(Some(&sourced("EDGE_ab12 7 > >")), b"other"));
        // The node's own id wins; nothing to go by, no id.
        let mut own = sourced("EDGE_ab12 7 > >");
        own.insert("Nats-Msg-Id", "n-1");
        assert_eq!(log_id(Some(&own), b"chunk").as_deref(), Some("n-1"));
        assert_eq!(log_id(None, b"chunk"), None);
    }
}
