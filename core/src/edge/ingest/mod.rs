//! Ingest: what nodes report, checked and turned into commands on the
//! platform's aggregates.
//!
//! Reports arrive in `UD_EDGE_IN`, forwarded by each node's agent from its own stream.
//! Four rooms:
//! * [`origin`]: who sent a message (the subject its permissions allowed);
//! * [`translate`]: what a report asks of the platform, as a command;
//! * [`lanes`]: the workers, batching heartbeats and task reports;
//! * here: the pinned consumer, and the handover between main-server
//!   instances (one ingests, the consumer pins it, the others stand by).
//!
//! A node may only speak for itself and for tasks assigned to it; anything
//! else is dropped and logged. A node's reports are handled in order by one
//! of several workers; heartbeats go through a lane of their own.

mod lanes;
pub mod origin;
pub mod translate;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, AckKind};
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tracing::{debug, warn};
use ud_schemas::report::{Report, ReportError};
use ud_schemas::{edge, NodeId, TaskId};

use super::{nats_err, EdgeError};
use crate::aggregate::Repository;
use crate::commands::TaskCommands;
use crate::node::{Node, NodeError};

pub use origin::origin;

pub const CONSUMER: &str = "ingest";
/// The consumer's priority group: the instance pinned to it ingests.
const PIN_GROUP: &str = "ingest";
/// The header naming the pin a message was delivered under.
const PIN_ID: &str = "Nats-Pin-Id";
/// A pinned instance that has not pulled for this long loses the pin to a standby one.
const PIN_TIMEOUT: Duration = Duration::from_secs(10);
/// What an instance was given and did not acknowledge goes out again after
/// this long. Below [`PIN_TIMEOUT`], so that when an instance dies what it
/// held is due again about when the pin moves; the next instance still
/// waits for all of it and takes it in stream order before anything newer
/// ([`gather`]): the server may hand out newer messages first, and handled
/// first they put a node's reports out of order (log lines shuffled, an
/// outcome before the start it follows).
const ACK_WAIT: Duration = Duration::from_secs(8);
/// How long a stopping instance waits for its workers before releasing the pin.
pub const HANDOVER: Duration = Duration::from_secs(5);
/// Each pull lasts this long (well inside `PIN_TIMEOUT`, so the pin is kept between pulls).
const PULL_EXPIRES: Duration = ud_schemas::streams::PULL_EXPIRES;
const WORKERS: usize = 8;
const _: () = assert!(ACK_WAIT.as_secs() < PIN_TIMEOUT.as_secs());
/// How long a node as last read serves heartbeats before it is read again
/// (a revocation is also enforced at once by the hub closing the link).
const NODE_CACHE_TTL: Duration = Duration::from_secs(5);

/// Why a report was dropped.
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    #[error("subject {0:?} is not a node report subject")]
    Subject(String),
    #[error("node {sender} sent a report in the name of {named}")]
    Impersonation { sender: String, named: String },
    #[error(transparent)]
    Report(ReportError),
    #[error(transparent)]
    Node(NodeError),
    #[error("refused: {0}")]
    Refused(String),
}

/// What the ingest works with.
#[derive(Clone)]
pub struct Ingest {
    commands: TaskCommands,
    nodes: Repository<Node>,
    /// Seconds between a stale run's graceful signal and its kill.
    cancel_grace_seconds: u32,
}

impl Ingest {
    pub fn new(commands: TaskCommands, cancel_grace_seconds: u32) -> Self {
        let nodes = Repository::cached(commands.store().clone(), 100_000, Some(NODE_CACHE_TTL));
        Self {
            commands,
            nodes,
            cancel_grace_seconds,
        }
    }

    /// Stops a run on `node` that is not the task's current one.
    async fn stop(&self, node: NodeId, task: TaskId, attempt: u32, reason: &str) {
        let Ok((subject, msg)) = super::dispatch::cancel(
            &node,
            task,
            Some(attempt),
            reason,
            self.cancel_grace_seconds,
        ) else {
            return;
        };
        let js = self.commands.store().jetstream();
        match js.send_publish(subject, msg).await {
            Ok(ack) => {
                if let Err(e) = ack.await {
                    warn!(task_id = %task, node_id = %node, error = %e, "cannot stop a stale run");
                }
            }
            Err(e) => {
                warn!(task_id = %task, node_id = %node, error = %e, "cannot stop a stale run")
            }
        }
    }
}

/// Whether this instance holds the ingest pin (it has been sent messages
/// since it last pulled anew), for operators to see which instance ingests.
pub type Pinned = std::sync::Arc<std::sync::atomic::AtomicBool>;

/// Consumes `UD_EDGE_IN` through `js` (a guarded connection: see
/// [`crate::guard`]) until the connection ends or `stop` is cancelled,
/// appending through `ingest`. Messages of one node are handled in order;
/// different nodes in parallel. On `stop` it hands over: it stops pulling,
/// lets the workers finish what they were given (up to [`HANDOVER`]) and
/// releases the pin, so a standby instance ingests at once.
pub async fn run(
    ingest: Ingest,
    js: jetstream::Context,
    pinned: Pinned,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), EdgeError> {
    let asked_to_stop = |stop: &tokio_util::sync::CancellationToken| stop.is_cancelled();
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
            ack_wait: ACK_WAIT,
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
        workers.spawn(lanes::worker(ingest.clone(), rx, Duration::ZERO));
        senders.push(tx);
    }
    // Heartbeats take their own lane: they change nothing another event of
    // the node depends on, and many at once cost far less than one by one.
    let (beats, rx) = mpsc::unbounded_channel();
    workers.spawn(lanes::worker(ingest.clone(), rx, lanes::HEARTBEAT_LINGER));
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
            r = route(&mut messages, &stream, &senders, &beats, &pinned) => r,
            () = stop.cancelled() => {
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
    stream: &jetstream::stream::Stream,
    senders: &[mpsc::UnboundedSender<jetstream::Message>],
    beats: &mpsc::UnboundedSender<jetstream::Message>,
    holds_pin: &Pinned,
) -> Option<bool> {
    let mut pinned = false;
    // The server names the pin on what it delivers; the client takes a new
    // pin on its own when it lost the old one (another instance held it
    // meanwhile), so a new name is a takeover too.
    let mut pin: Option<String> = None;
    while let Some(m) = messages.next().await {
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "ingest pull failed");
                return Some(pinned);
            }
        };
        let named = m.headers.as_ref().and_then(|h| h.get_last(PIN_ID));
        let repinned = named.is_some_and(|n| pin.as_deref() != Some(n.as_str()));
        if repinned {
            pin = named.map(|n| n.as_str().to_owned());
        }
        let taken = if pinned && !repinned {
            vec![m]
        } else {
            pinned = true;
            holds_pin.store(true, std::sync::atomic::Ordering::Relaxed);
            match gather(messages, stream, m).await {
                Ok(taken) => taken,
                Err(taken) => {
                    for m in taken {
                        let _ = m.ack_with(AckKind::Nak(None)).await;
                    }
                    return Some(pinned);
                }
            }
        };
        for m in taken {
            let lane = if Report::is_heartbeat(&m.subject) {
                beats
            } else {
                let mut h = DefaultHasher::new();
                origin::lane_key(&m.subject).hash(&mut h);
                &senders[(h.finish() % WORKERS as u64) as usize]
            };
            if lane.send(m).is_err() {
                return None;
            }
        }
    }
    Some(pinned)
}

/// How long a new holder of the pin waits for what its predecessor was
/// given and did not acknowledge: it comes back after the ack wait.
const TAKEOVER: Duration = Duration::from_secs(ACK_WAIT.as_secs() + 2);

/// On taking the pin: what the previous holder was given and did not
/// acknowledge (it died holding it) comes back only after the ack wait,
/// and may come after newer messages, which handled first would put a
/// node's reports out of order (an outcome before the start it follows,
/// log lines shuffled). Holds what arrives until every message given out
/// and not acknowledged is here (or [`TAKEOVER`] has passed), and returns
/// it in stream order. `Err`: the pull failed; what was held goes back.
async fn gather(
    messages: &mut consumer::pull::Stream,
    stream: &jetstream::stream::Stream,
    first: jetstream::Message,
) -> Result<Vec<jetstream::Message>, Vec<jetstream::Message>> {
    let seq = |m: &jetstream::Message| m.info().map_or(0, |i| i.stream_sequence);
    let mut held = vec![first];
    let deadline = tokio::time::Instant::now() + TAKEOVER;
    loop {
        // Everything unacknowledged when the server answers was delivered
        // at or below its highest delivered sequence: once that many of
        // those are held, nothing is left with anyone else.
        let here = |info: &consumer::Info| {
            let below = info.delivered.stream_sequence;
            held.iter().filter(|m| seq(m) <= below).count() >= info.num_ack_pending
        };
        match stream.consumer_info(CONSUMER).await {
            Ok(info) if here(&info) => break,
            Ok(info) if tokio::time::Instant::now() >= deadline => {
                warn!(
                    held = held.len(),
                    pending = info.num_ack_pending,
                    "ingest took over without all its predecessor held"
                );
                break;
            }
            Ok(info) => debug!(
                held = held.len(),
                pending = info.num_ack_pending,
                "ingest taking over; waiting for what its predecessor held"
            ),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                warn!(error = %e, "ingest took over without reading its consumer");
                break;
            }
            Err(e) => debug!(error = %e, "ingest cannot read its consumer"),
        }
        let until = deadline.min(tokio::time::Instant::now() + Duration::from_millis(200));
        while let Ok(next) = tokio::time::timeout_at(until, messages.next()).await {
            match next {
                Some(Ok(m)) => held.push(m),
                Some(Err(e)) => {
                    warn!(error = %e, "ingest pull failed");
                    return Err(held);
                }
                None => return Err(held),
            }
        }
    }
    held.sort_by_key(seq);
    if held.len() > 1 {
        debug!(held = held.len(), "ingest took over");
    }
    Ok(held)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ud_testkit::NatsServer;

    fn seqs(msgs: &[jetstream::Message]) -> Vec<u64> {
        msgs.iter()
            .map(|m| m.info().map_or(0, |i| i.stream_sequence))
            .collect()
    }

    /// An instance that dies holding messages: the next one to take the
    /// pin gets newer messages before they come back (here the pin moves
    /// before the ack wait ends), and still hands them on in stream order.
    #[tokio::test]
    async fn a_takeover_hands_on_what_the_dead_holder_had_first() -> anyhow::Result<()> {
        let nats = NatsServer::start().await?;
        let js = jetstream::new(nats.connect().await?);
        let stream = js
            .create_stream(jetstream::stream::Config {
                name: "TAKEOVER".into(),
                subjects: vec!["r.>".into()],
                ..Default::default()
            })
            .await?;
        let consumer = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(CONSUMER.into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(4),
                priority_policy: consumer::PriorityPolicy::PinnedClient,
                priority_groups: vec![PIN_GROUP.into()],
                priority_timeout: Duration::from_secs(2),
                ..Default::default()
            })
            .await?;
        for i in 1..=3 {
            js.publish(format!("r.{i}"), "".into()).await?.await?;
        }
        // The first holder takes three and dies without acknowledging.
        {
            let dead = jetstream::new(nats.connect().await?);
            let c: consumer::PullConsumer = dead
                .get_stream("TAKEOVER")
                .await?
                .get_consumer(CONSUMER)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut pull = c.stream().group(PIN_GROUP).messages().await?;
            for _ in 0..3 {
                pull.next()
                    .await
                    .ok_or_else(|| anyhow::anyhow!("ended"))??;
            }
        }
        for i in 4..=5 {
            js.publish(format!("r.{i}"), "".into()).await?.await?;
        }
        let mut pull = consumer
            .stream()
            .group(PIN_GROUP)
            .expires(Duration::from_secs(1))
            .messages()
            .await?;
        let first = pull
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("ended"))??;
        let first_seq = first.info().map_or(0, |i| i.stream_sequence);
        // What `route` tells a takeover by, when the pin changes under one pull.
        assert!(
            first
                .headers
                .as_ref()
                .and_then(|h| h.get_last(PIN_ID))
                .is_some(),
            "a pinned delivery names its pin"
        );
        let taken = gather(&mut pull, &stream, first)
            .await
            .map_err(|_| anyhow::anyhow!("pull failed"))?;
        assert_eq!(
            seqs(&taken),
            vec![1, 2, 3, 4, 5],
            "the first message after the takeover was {first_seq}"
        );
        Ok(())
    }
}
