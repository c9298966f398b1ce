//! Ingest: what nodes report, checked and turned into platform events.
//!
//! Messages arrive in `UD_EDGE_IN`, sourced from each node's own stream. The
//! hub stamps each with `Nats-Stream-Source` naming the stream it came from;
//! that, not the subject, says which node sent it. A node may only speak for
//! itself and for tasks assigned to it; anything else is dropped and logged.
//! A node's events are handled in order by one of several workers; heartbeats
//! go through a lane of their own, appended many at a time. With several
//! main-server instances, one ingests (the consumer pins it) and the others
//! stand by.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, AckKind};
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tracing::{debug, warn};
use ud_schemas::codec::{self, EventMeta};
use ud_schemas::{edge, now_millis, Event, NodeEvent, NodeId, TaskEvent};

use super::{enroll, nats_err, EdgeError};
use crate::commands::{CommandError, TaskCommands};
use crate::node::{self, NodeCommand};
use crate::store::Expect;
use crate::task::{TaskCommand, TaskError};

pub const CONSUMER: &str = "ingest";
/// The consumer's priority group: the instance pinned to it ingests.
const PIN_GROUP: &str = "ingest";
/// A pinned instance that has not pulled for this long loses the pin to a standby one.
const PIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopping instance waits for its workers before releasing the pin.
pub const HANDOVER: Duration = Duration::from_secs(5);
/// Each pull lasts this long (well inside `PIN_TIMEOUT`, so the pin is kept between pulls).
const PULL_EXPIRES: Duration = Duration::from_secs(3);
const WORKERS: usize = 8;

/// Why a message was dropped.
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    #[error("not from a node stream")]
    NoSource,
    #[error("subject {0:?} is not a node event subject")]
    Subject(String),
    #[error("node {sender} sent an event in the name of {named}")]
    Impersonation { sender: String, named: String },
    #[error("cannot decode: {0}")]
    Decode(String),
    #[error("nodes may not send {0}")]
    NotAllowed(String),
    #[error("refused: {0}")]
    Refused(String),
}

const SOURCE: &str = "Nats-Stream-Source";
const SOURCE_NAME: &str = "Nats-Stream-Source:";

/// The node a sourced message came from, from `Nats-Stream-Source`.
pub fn origin(headers: Option<&async_nats::HeaderMap>) -> Option<String> {
    // The hub removes any such header a node wrote and adds its own last.
    let value = headers?.get_last(SOURCE)?.as_str();
    // Except a line the node left unterminated: nats-server then cuts that
    // line's last two bytes and appends its own header to it. What the hub
    // wrote is after the last name.
    let value = value.rsplit(SOURCE_NAME).next()?;
    let stream = value.split_whitespace().next()?.split(':').next()?;
    stream.strip_prefix("EDGE_").map(str::to_owned)
}

enum Outcome {
    Done,
    Dropped(Rejected),
    Retry(String),
}

fn task_command(node_id: NodeId, e: TaskEvent) -> Result<TaskCommand, Rejected> {
    Ok(match e {
        TaskEvent::Started(s) => TaskCommand::Start {
            node_id,
            attempt: s.attempt,
        },
        TaskEvent::Preparing(p) if p.node_id == node_id => TaskCommand::RecordPreparing {
            node_id,
            attempt: p.attempt,
            step: p.step,
        },
        TaskEvent::Prepared(p) if p.node_id == node_id => TaskCommand::RecordPrepared(Box::new(p)),
        TaskEvent::Outputs(o) if o.node_id == node_id => TaskCommand::RecordOutputs(Box::new(o)),
        TaskEvent::Succeeded(s) => TaskCommand::Succeed {
            node_id,
            exit_code: s.exit_code,
        },
        TaskEvent::Failed(f) => TaskCommand::Fail {
            node_id,
            exit_code: f.exit_code,
            reason: f.reason,
        },
        TaskEvent::Cancelled(_) => TaskCommand::ConfirmCancelled { node_id },
        TaskEvent::TimedOut(_) => TaskCommand::TimeOut { node_id },
        other => return Err(Rejected::NotAllowed(format!("task.{}", other.name()))),
    })
}

/// Nodes as last loaded, so that heartbeats need no stream reads: a
/// revocation reaches the cache within `NODE_CACHE_TTL` (and the hub closes
/// the revoked node's link at once anyway).
type NodeCache =
    std::collections::HashMap<NodeId, (Option<crate::node::Node>, u64, std::time::Instant)>;
const NODE_CACHE_TTL: Duration = Duration::from_secs(5);

async fn load_cached(
    store: &crate::EventStore,
    cache: &mut NodeCache,
    id: NodeId,
    fresh: bool,
) -> Result<(Option<crate::node::Node>, u64), EdgeError> {
    if !fresh {
        if let Some((n, seq, at)) = cache.get(&id) {
            if at.elapsed() < NODE_CACHE_TTL {
                return Ok((n.clone(), *seq));
            }
        }
    }
    let (n, seq) = enroll::load(store, &id).await?;
    cache.insert(id, (n.clone(), seq, std::time::Instant::now()));
    Ok((n, seq))
}

/// The node that sent `msg` (from its source stream, which must match the
/// node the subject names) and the canonical subject.
fn sender(msg: &jetstream::Message) -> Result<(NodeId, String), Outcome> {
    let Some(sender) = origin(msg.headers.as_ref()) else {
        return Err(Outcome::Dropped(Rejected::NoSource));
    };
    let Some((named, canonical)) = edge::canonical_subject(msg.subject.as_str()) else {
        return Err(Outcome::Dropped(Rejected::Subject(msg.subject.to_string())));
    };
    if edge::hex(&named) != sender {
        return Err(Outcome::Dropped(Rejected::Impersonation {
            sender,
            named: named.to_string(),
        }));
    }
    Ok((named, canonical))
}

/// The platform events a node's own event becomes, checked against the node.
async fn node_events(
    store: &crate::EventStore,
    cache: &mut NodeCache,
    node_id: NodeId,
    e: NodeEvent,
    meta: EventMeta,
) -> Result<(Vec<Event>, EventMeta, Expect), Outcome> {
    // Registrations check against the stream; heartbeats may use the cache.
    let fresh = !matches!(e, NodeEvent::Heartbeat(_));
    let (current, last) = load_cached(store, cache, node_id, fresh)
        .await
        .map_err(|e| Outcome::Retry(e.to_string()))?;
    let (command, expect) = match e {
        NodeEvent::Registered(r) => (
            NodeCommand::Register {
                name: r.name,
                labels: r.labels,
                resources: r.resources,
            },
            Expect::LastSeq(last),
        ),
        // Liveness runs on the hub's clock.
        NodeEvent::Heartbeat(h) => (
            NodeCommand::Heartbeat {
                at: now_millis(),
                running_tasks: h.running_tasks,
                disk_free_mb: h.disk_free_mb,
                low_disk: h.low_disk,
            },
            Expect::Any,
        ),
        other => {
            return Err(Outcome::Dropped(Rejected::NotAllowed(format!(
                "node.{}",
                other.name()
            ))))
        }
    };
    let events = node::decide(current.as_ref(), command, now_millis())
        .map_err(|e| Outcome::Dropped(Rejected::Refused(e.to_string())))?;
    Ok((
        events
            .into_iter()
            .map(|e| Event::Node(node_id, e))
            .collect(),
        meta,
        expect,
    ))
}

/// A heartbeat ready to append, or what became of it.
async fn heartbeat(
    store: &crate::EventStore,
    cache: &mut NodeCache,
    msg: &jetstream::Message,
) -> Result<(Event, EventMeta), Outcome> {
    let (node_id, canonical) = sender(msg)?;
    let envelope = codec::decode_message(&canonical, msg.headers.as_ref(), &msg.payload)
        .map_err(|e| Outcome::Dropped(Rejected::Decode(e.to_string())))?;
    match envelope.event {
        Event::Node(id, e @ NodeEvent::Heartbeat(_)) if id == node_id => {
            let meta = EventMeta {
                actor: format!("node:{node_id}"),
                ..envelope.meta
            };
            let (mut events, meta, _) = node_events(store, cache, node_id, e, meta).await?;
            match (events.pop(), events.is_empty()) {
                (Some(event), true) => Ok((event, meta)),
                _ => Err(Outcome::Retry("a heartbeat that is not one event".into())),
            }
        }
        Event::Node(id, _) => Err(Outcome::Dropped(Rejected::Impersonation {
            sender: node_id.to_string(),
            named: id.to_string(),
        })),
        _ => Err(Outcome::Retry("not a heartbeat".into())),
    }
}

fn is_heartbeat(msg: &jetstream::Message) -> bool {
    msg.subject.ends_with(".heartbeat")
}

async fn handle(
    commands: &TaskCommands,
    cache: &mut NodeCache,
    msg: &jetstream::Message,
) -> Outcome {
    let (node_id, canonical) = match sender(msg) {
        Ok(x) => x,
        Err(outcome) => return outcome,
    };
    let store = commands.store();
    if let Some(task) = canonical.strip_prefix("ud.log.") {
        // Output of a task assigned to this node, re-published as is.
        let Ok(task_id) = task.parse() else {
            return Outcome::Dropped(Rejected::Subject(canonical));
        };
        match store.load_task(&task_id).await {
            Ok(Some((t, _))) if t.state.live_node() == Some(node_id) || t.state.is_terminal() => {}
            Ok(_) => {
                return Outcome::Dropped(Rejected::Refused(format!(
                    "log for task {task_id} not assigned to this node"
                )))
            }
            Err(e) => return Outcome::Retry(e.to_string()),
        }
        let mut headers = async_nats::HeaderMap::new();
        if let Some(id) = msg.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")) {
            headers.insert("Nats-Msg-Id", id.as_str());
        }
        return match store
            .jetstream()
            .publish_with_headers(canonical, headers, msg.payload.clone())
            .await
        {
            Ok(ack) => match ack.await {
                Ok(_) => Outcome::Done,
                Err(e) => Outcome::Retry(e.to_string()),
            },
            Err(e) => Outcome::Retry(e.to_string()),
        };
    }
    let envelope = match codec::decode_message(&canonical, msg.headers.as_ref(), &msg.payload) {
        Ok(e) => e,
        Err(e) => return Outcome::Dropped(Rejected::Decode(e.to_string())),
    };
    let actor = format!("node:{node_id}");
    match envelope.event {
        Event::Node(id, e) if id == node_id => {
            let (events, meta, expect) = match node_events(
                store,
                cache,
                node_id,
                e,
                EventMeta {
                    actor,
                    ..envelope.meta.clone()
                },
            )
            .await
            {
                Ok(x) => x,
                Err(outcome) => return outcome,
            };
            match store.append_all(&events, &meta, expect).await {
                Ok(_) => Outcome::Done,
                Err(crate::StoreError::Conflict) => {
                    Outcome::Retry("node changed concurrently".into())
                }
                Err(e) => Outcome::Retry(e.to_string()),
            }
        }
        Event::Node(id, _) => Outcome::Dropped(Rejected::Impersonation {
            sender: node_id.to_string(),
            named: id.to_string(),
        }),
        Event::Task(task_id, e) => {
            let command = match task_command(node_id, e) {
                Ok(c) => c,
                Err(r) => return Outcome::Dropped(r),
            };
            let start_of = match &command {
                TaskCommand::Start { attempt, .. } => Some(*attempt),
                _ => None,
            };
            let was_start = start_of.is_some();
            match commands.execute(task_id, command, &actor, |_| true).await {
                Ok(_) => Outcome::Done,
                Err(CommandError::Conflict) => Outcome::Retry("task changed concurrently".into()),
                Err(CommandError::Unavailable(e)) => Outcome::Retry(e),
                Err(CommandError::Rejected(
                    TaskError::WrongNode(_) | TaskError::InvalidTransition { .. },
                )) if was_start => {
                    // The same start again (its first append was stored but
                    // not confirmed, so it came back): nothing to do.
                    if let Ok(Some((t, _))) = store.load_task(&task_id).await {
                        let same = matches!(
                            t.state,
                            crate::task::TaskState::Running { node_id: n, attempt: a }
                                | crate::task::TaskState::Cancelling { node_id: n, attempt: a, .. }
                                if n == node_id && Some(a) == start_of
                        );
                        if same {
                            return Outcome::Done;
                        }
                    }
                    // A stale dispatch: stop that run.
                    stop_stale(commands, node_id, task_id).await;
                    Outcome::Dropped(Rejected::Refused(format!("stale start of task {task_id}")))
                }
                Err(e) => Outcome::Dropped(Rejected::Refused(format!("task {task_id}: {e}"))),
            }
        }
        Event::Auth(..) => Outcome::Dropped(Rejected::NotAllowed("token events".into())),
    }
}

async fn stop_stale(commands: &TaskCommands, node: NodeId, task: ud_schemas::TaskId) {
    let cancel = ud_schemas::dispatch::DispatchCancel {
        at: now_millis(),
        task_id: task,
        reason: "stale assignment".into(),
        grace_seconds: 10,
    };
    if let Ok(bytes) = ud_schemas::dispatch::to_cbor(&cancel) {
        let subject = edge::dispatch_subject(&node, &task, "cancel");
        if let Ok(ack) = commands
            .store()
            .jetstream()
            .publish(subject, bytes.into())
            .await
        {
            let _ = ack.await;
        }
    }
}

/// Most messages waiting at once that a worker takes together.
const BATCH: usize = 512;

/// How long the heartbeat lane waits for more heartbeats once it has one.
const HEARTBEAT_LINGER: Duration = Duration::from_millis(50);

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

async fn worker(
    commands: TaskCommands,
    mut rx: mpsc::UnboundedReceiver<jetstream::Message>,
    linger: Duration,
) {
    let mut cache = NodeCache::new();
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        take(&mut rx, &mut batch, linger).await;
        // Runs of heartbeats are appended together, many publishes in flight;
        // runs of task events and output go task by task, different tasks at
        // once, each task's in order; everything else one by one, in order.
        let mut rest = batch.as_slice();
        while !rest.is_empty() {
            let beats = rest.iter().take_while(|m| is_heartbeat(m)).count();
            let tasks = rest.iter().take_while(|m| task_of(m).is_some()).count();
            if beats >= 2 {
                heartbeats(&commands, &mut cache, &rest[..beats]).await;
                rest = &rest[beats..];
            } else if tasks >= 2 {
                by_task(&commands, &rest[..tasks]).await;
                rest = &rest[tasks..];
            } else {
                one(&commands, &mut cache, &rest[0]).await;
                rest = &rest[1..];
            }
        }
        batch.clear();
    }
}

/// The task a node's task event or output chunk is about (from its subject).
fn task_of(msg: &jetstream::Message) -> Option<String> {
    let (_, canonical) = edge::canonical_subject(msg.subject.as_str())?;
    let rest = canonical
        .strip_prefix("ud.task.")
        .or_else(|| canonical.strip_prefix("ud.log."))?;
    Some(rest.split('.').next()?.to_owned())
}

/// Messages about several tasks: each task's in order, the tasks in parallel
/// (what costs is the round trips to the stream, not the work).
async fn by_task(commands: &TaskCommands, msgs: &[jetstream::Message]) {
    let mut order: Vec<String> = Vec::new();
    let mut groups: std::collections::HashMap<String, Vec<&jetstream::Message>> =
        std::collections::HashMap::new();
    for m in msgs {
        let key = task_of(m).unwrap_or_default();
        let group = groups.entry(key.clone()).or_default();
        if group.is_empty() {
            order.push(key);
        }
        group.push(m);
    }
    let runs = order
        .into_iter()
        .filter_map(|k| groups.remove(&k))
        .map(|group| async move {
            // Task events and output never read the node cache.
            let mut cache = NodeCache::new();
            for m in group {
                one(commands, &mut cache, m).await;
            }
        });
    futures::future::join_all(runs).await;
}

async fn heartbeats(commands: &TaskCommands, cache: &mut NodeCache, msgs: &[jetstream::Message]) {
    let store = commands.store();
    let mut items = Vec::with_capacity(msgs.len());
    let mut ready = Vec::with_capacity(msgs.len());
    for m in msgs {
        match heartbeat(store, cache, m).await {
            Ok((event, meta)) => {
                items.push((event, meta, Expect::Any));
                ready.push(m);
            }
            Err(Outcome::Dropped(why)) => {
                warn!(subject = %m.subject, reason = %why, "node event dropped");
                let _ = m.ack().await;
            }
            // Anything else takes the one-by-one path with its retries.
            Err(_) => one(commands, cache, m).await,
        }
    }
    let results = store.append_pipelined(items, BATCH).await;
    for (m, r) in ready.into_iter().zip(results) {
        match r {
            Ok(_) => {
                let _ = m.ack().await;
            }
            Err(_) => one(commands, cache, m).await,
        }
    }
}

/// Handles one message, retrying a few times before asking for redelivery.
async fn one(commands: &TaskCommands, cache: &mut NodeCache, msg: &jetstream::Message) {
    let mut attempts = 0;
    loop {
        match handle(commands, cache, msg).await {
            Outcome::Done => {
                debug!(subject = %msg.subject, "ingested");
                let _ = msg.ack().await;
            }
            Outcome::Dropped(why) => {
                warn!(subject = %msg.subject, reason = %why, "node event dropped");
                let _ = msg.ack().await;
            }
            Outcome::Retry(why) if attempts < 5 => {
                attempts += 1;
                debug!(subject = %msg.subject, reason = %why, attempts, "retrying");
                continue;
            }
            Outcome::Retry(why) => {
                warn!(subject = %msg.subject, reason = %why, "ingest failed; redelivery later");
                let _ = msg
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
        }
        break;
    }
}

/// Whether this instance holds the ingest pin (it has been sent messages
/// since it last pulled anew), for operators to see which instance ingests.
pub type Pinned = std::sync::Arc<std::sync::atomic::AtomicBool>;

/// Consumes `UD_EDGE_IN` through `js` (a guarded connection: see
/// [`crate::guard`]) until the connection ends or `stop` turns true,
/// appending through `commands`. Messages of one node are handled in order;
/// different nodes in parallel. On `stop` it hands over: it stops pulling,
/// lets the workers finish what they were given (up to [`HANDOVER`]) and
/// releases the pin, so a standby instance ingests at once.
pub async fn run(
    commands: TaskCommands,
    js: jetstream::Context,
    pinned: Pinned,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), EdgeError> {
    let asked_to_stop = |stop: &tokio::sync::watch::Receiver<bool>| *stop.borrow();
    let stream = loop {
        // The hub reconciler creates the stream; wait for it.
        match js.get_stream(edge::EDGE_IN).await {
            Ok(s) => break s,
            Err(_) if asked_to_stop(&stop) => return Ok(()),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let consumer = stream
        // Created or updated: consumers made before pinning get it here.
        .create_consumer(consumer::pull::Config {
            durable_name: Some(CONSUMER.into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 20_000,
            // One instance at a time takes a node's events, so that they
            // are handled in the order the node sent them; another takes
            // over when it stops pulling.
            priority_policy: consumer::PriorityPolicy::PinnedClient,
            priority_groups: vec![PIN_GROUP.into()],
            priority_timeout: PIN_TIMEOUT,
            ..Default::default()
        })
        .await
        .map_err(nats_err)?;
    let mut senders = Vec::new();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..WORKERS {
        // Unbounded, so that routing never waits on a worker: what is in
        // flight is bounded by the consumer's max_ack_pending instead. (A
        // router waiting on a worker that waits on an ack that the same
        // connection cannot deliver while the router stalls would deadlock.)
        let (tx, rx) = mpsc::unbounded_channel();
        workers.spawn(worker(commands.clone(), rx, Duration::ZERO));
        senders.push(tx);
    }
    // Heartbeats take their own lane: they change nothing another event of
    // the node depends on, and many at once cost far less than one by one.
    let (beats, rx) = mpsc::unbounded_channel();
    workers.spawn(worker(commands.clone(), rx, HEARTBEAT_LINGER));
    // A pull subscription can fail under load (missed idle heartbeats, a
    // hub reload): bind again and go on; unacknowledged messages come back.
    loop {
        let pull = consumer
            .stream()
            .group(PIN_GROUP)
            .expires(PULL_EXPIRES)
            .heartbeat(PULL_EXPIRES / 2)
            .messages();
        let mut messages = match pull.await {
            Ok(m) => m,
            Err(_) if asked_to_stop(&stop) => return Ok(()),
            Err(e) => {
                warn!(error = %e, "ingest cannot pull; trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let routed = tokio::select! {
            r = route(&mut messages, &senders, &beats, &pinned) => r,
            // Only a stop that is asked for: a dropped sender asks nothing.
            // (The guard `wait_for` returns must not live across the awaits below.)
            () = async {
                if stop.wait_for(|s| *s).await.is_err() {
                    std::future::pending::<()>().await;
                }
            } => {
                // What the pull holds already but no worker was given goes
                // back (below) ahead of anything newer; what is still on its
                // way comes back after the ack wait.
                let mut held = Vec::new();
                while let Some(Some(Ok(m))) = messages.next().now_or_never() {
                    held.push(m);
                }
                drop(messages);
                // Closed lanes let the workers finish what they hold, then end.
                drop((senders, beats));
                let finished = async { while workers.join_next().await.is_some() {} };
                if tokio::time::timeout(HANDOVER, finished).await.is_err() {
                    warn!("ingest workers still busy; what they hold comes back after the ack wait");
                    workers.abort_all();
                }
                for m in held {
                    let _ = m.ack_with(AckKind::Nak(None)).await;
                }
                // Acknowledgements are only queued until the client sends them.
                let _ = js.client().flush().await;
                if pinned.swap(false, std::sync::atomic::Ordering::Relaxed) {
                    if let Err(e) = stream.unpin_consumer(CONSUMER, PIN_GROUP).await {
                        warn!(error = %e, "cannot release the ingest pin; a standby takes it when it expires");
                    }
                }
                tracing::info!("ingest stopped and handed over");
                return Ok(());
            }
        };
        let Some(held) = routed else {
            return Ok(());
        };
        warn!("ingest pull ended; binding again");
        pinned.store(false, std::sync::atomic::Ordering::Relaxed);
        if held {
            // The pin was this instance's: release it, or the next pull
            // (a new client to the server) would stand by until it expires.
            if let Err(e) = stream.unpin_consumer(CONSUMER, PIN_GROUP).await {
                debug!(error = %e, "cannot release the ingest pin");
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Hands pulled messages to the lanes until the pull fails or the lanes are
/// gone (`None`). When the pull fails, says whether a message came, i.e.
/// whether this instance held the pin (only the pinned client is sent any).
async fn route(
    messages: &mut consumer::pull::Stream,
    senders: &[mpsc::UnboundedSender<jetstream::Message>],
    beats: &mpsc::UnboundedSender<jetstream::Message>,
    holds_pin: &Pinned,
) -> Option<bool> {
    let mut pinned = false;
    while let Some(m) = messages.next().await {
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "ingest pull failed");
                return Some(pinned);
            }
        };
        if !pinned {
            pinned = true;
            holds_pin.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let lane = if is_heartbeat(&m) {
            beats
        } else {
            let mut h = DefaultHasher::new();
            origin(m.headers.as_ref()).hash(&mut h);
            &senders[(h.finish() % WORKERS as u64) as usize]
        };
        if lane.send(m).is_err() {
            return None;
        }
    }
    Some(pinned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(values: &[&str]) -> async_nats::HeaderMap {
        let mut h = async_nats::HeaderMap::new();
        for v in values {
            h.append(SOURCE, *v);
        }
        h
    }

    #[test]
    fn the_origin_is_what_the_hub_wrote_last() {
        let origin = |values: &[&str]| origin(Some(&source(values)));
        assert_eq!(origin(&["EDGE_ab12 7 > >"]).as_deref(), Some("ab12"));
        assert_eq!(
            origin(&["EDGE_x 1", "EDGE_ab12 7 > >"]).as_deref(),
            Some("ab12")
        );
        // A node's unterminated line that the hub's header was appended to.
        assert_eq!(
            origin(&["EDGE_x Nats-Stream-Source: EDGE_ab12 7 > >"]).as_deref(),
            Some("ab12")
        );
        assert_eq!(origin(&["OTHER 1"]), None);
        assert_eq!(super::origin(None), None);
    }
}
