//! Forwards this node's reports to the hub. The agent writes every report
//! into the node's own stream first (so reporting works while the link is
//! down); this forwarder reads that stream through the durable pull
//! consumer `hub` and publishes each report to the hub on
//! `ud.deliver.<node_id>.…`, where `UD_EDGE_IN` stores it, and acknowledges
//! it in the node's stream once the hub has stored it.
//!
//! The hub sets up nothing for a node: a node joins with its link alone.
//!
//! Order: what is read at once is published at once, and nothing more is
//! read before the hub stored all of it. When anything fails, the pull is
//! dropped and its last ask let expire, the consumer is reset to its
//! acknowledged floor and everything after it goes again, in order; what the hub had stored
//! already it keeps once (by `Nats-Msg-Id`, within the stream's two-minute
//! duplicate window).
//!
//! Events keep their ids: a report's `Nats-Msg-Id` is its event id (or a
//! log chunk's id), which the platform's events derived from it carry too.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::{FutureExt, StreamExt};
use tracing::{debug, info, warn};
use ud_schemas::{edge, NodeId};

use crate::{nats, AgentError};

/// The most reports published before the hub's acknowledgements are awaited.
pub const WINDOW: usize = 256;

/// How many reports a forwarder starts with publishing at once: it doubles
/// after every full burst the hub stored, up to [`WINDOW`], and halves after
/// a failure. (The hub's stream takes at most 10,000 messages waiting at
/// once and drops the rest: hundreds of nodes with a backlog each sending
/// [`WINDOW`] at once after a mass join or a hub restart overran it, and
/// every node sent its bursts again and again.)
const WINDOW_FIRST: usize = 8;

/// How long one ask of the pull from the node's stream waits for reports.
const PULL_EXPIRES: Duration = Duration::from_secs(2);

/// Waits after a failure, growing to [`RETRY_MOST`].
const RETRY_LEAST: Duration = Duration::from_millis(200);
const RETRY_MOST: Duration = Duration::from_secs(3);

/// NATS's atomic batch headers (the hub's `UD_EDGE_IN` allows atomic
/// publishing).
const BATCH_ID: &str = "Nats-Batch-Id";
const BATCH_SEQUENCE: &str = "Nats-Batch-Sequence";
const BATCH_COMMIT: &str = "Nats-Batch-Commit";

/// Runs in a row that forwarded nothing before the agent says so aloud
/// (about half a minute at [`RETRY_MOST`]).
const SAY_AFTER: u32 = 10;

/// The forward consumer as it should be: pulled, acknowledged up to a place.
fn consumer_config(start: Option<u64>) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(edge::FORWARD_CONSUMER.into()),
        deliver_policy: match start {
            Some(start_sequence) => consumer::DeliverPolicy::ByStartSequence { start_sequence },
            None => consumer::DeliverPolicy::All,
        },
        ack_policy: consumer::AckPolicy::All,
        ack_wait: Duration::from_secs(60),
        max_ack_pending: 4 * WINDOW as i64,
        ..Default::default()
    }
}

/// Creates the forward consumer on the node's stream, or takes over the
/// push consumer the hub sourced through before (from where the hub had
/// acknowledged it).
pub async fn ensure_consumer(stream: &jetstream::stream::Stream) -> Result<(), AgentError> {
    match stream.consumer_info(edge::FORWARD_CONSUMER).await {
        Ok(info) if info.config.deliver_subject.is_none() => Ok(()),
        Ok(info) => {
            let start = info.ack_floor.stream_sequence + 1;
            stream
                .delete_consumer(edge::FORWARD_CONSUMER)
                .await
                .map_err(nats)?;
            stream
                .create_consumer(consumer_config(Some(start)))
                .await
                .map_err(nats)?;
            info!(
                start,
                "the node's reports are forwarded from where the hub's source stopped"
            );
            Ok(())
        }
        Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => {
            stream
                .create_consumer(consumer_config(None))
                .await
                .map_err(nats)?;
            Ok(())
        }
        Err(e) => Err(nats(e)),
    }
}

/// The id the hub keeps a forwarded report without an id of its own once
/// under: the node, its stream's creation (a stream made anew starts its
/// sequence again; and no other node can know it to take the id first) and
/// the report's place.
fn forward_id(node: &NodeId, created: i128, seq: u64) -> String {
    format!("{}.{created:x}.{seq}", edge::hex(node))
}

/// The headers a report is forwarded with: its own, with its place in the
/// node's stream ([`edge::ORIGIN_SEQ`]). Its `Nats-Msg-Id` (an event's id,
/// a log chunk's) is what the hub keeps it once by, and what the platform
/// derives its events' ids from; a report without one gets `id`.
fn forward_headers(
    own: Option<&async_nats::HeaderMap>,
    id: &str,
    seq: u64,
) -> async_nats::HeaderMap {
    let mut h = own.cloned().unwrap_or_default();
    if h.get("Nats-Msg-Id").is_none() {
        h.insert("Nats-Msg-Id", id);
    }
    h.insert(edge::ORIGIN_SEQ, seq.to_string().as_str());
    h
}

/// Forwards for as long as the agent runs, starting over after any failure.
pub async fn keep(local: jetstream::Context, client: async_nats::Client, node: NodeId) {
    let hub = Hub {
        js: jetstream::new(client.clone()),
        client,
    };
    let mut wait = RETRY_LEAST;
    let mut window = WINDOW_FIRST;
    let mut idle = 0u32;
    loop {
        match forward(&local, &hub, &node, &mut window).await {
            Ok(()) => {
                if idle >= SAY_AFTER {
                    info!(node_id = %node, "the hub takes this node's reports again");
                }
                idle = 0;
                wait = RETRY_LEAST;
            }
            Err(e) => {
                idle += 1;
                if idle == SAY_AFTER {
                    warn!(node_id = %node, error = %e, "the hub has taken none of this node's reports for a while; they wait in its stream");
                } else {
                    debug!(node_id = %node, error = %e, "forwarding to the hub stopped; starting over");
                }
                wait = (wait * 2).min(RETRY_MOST);
            }
        }
        window = (window / 2).max(1);
        tokio::time::sleep(wait).await;
    }
}

/// One run of forwarding, from the consumer's acknowledged floor until a
/// failure, publishing at most `window` reports at once. Returns `Ok` when
/// it forwarded something and then failed (the next run starts soon), an
/// error when it forwarded nothing.
async fn forward(
    local: &jetstream::Context,
    hub: &Hub,
    node: &NodeId,
    window: &mut usize,
) -> Result<(), AgentError> {
    let mut stream = local.get_stream(edge::stream(node)).await.map_err(nats)?;
    let created = stream
        .info()
        .await
        .map_err(nats)?
        .created
        .unix_timestamp_nanos();
    let consumer: consumer::PullConsumer = stream
        .get_consumer(edge::FORWARD_CONSUMER)
        .await
        .map_err(nats)?;
    // What an earlier run read but the hub did not store comes again first.
    stream
        .reset_consumer(edge::FORWARD_CONSUMER, None)
        .await
        .map_err(nats)?;
    // One pull for the whole run: every pull subscribes anew, and the
    // node's link carries its inbox's interest to the hub, which weighs it
    // against every other node's link.
    let mut pull = consumer
        .stream()
        .max_messages_per_batch(WINDOW)
        .expires(PULL_EXPIRES)
        .heartbeat(PULL_EXPIRES / 2)
        .messages()
        .await
        .map_err(nats)?;
    let mut forwarded = false;
    while let Some(first) = pull.next().await {
        let sent = match first {
            Ok(first) => {
                let mut burst = vec![first];
                // An error read while gathering ends the run once what was
                // read before it is sent.
                let mut broken = None;
                while burst.len() < *window {
                    match pull.next().now_or_never() {
                        Some(Some(Ok(m))) => burst.push(m),
                        Some(Some(Err(e))) => {
                            broken = Some(nats(e));
                            break;
                        }
                        _ => break,
                    }
                }
                let sent = send(hub, node, created, &burst)
                    .await
                    .and(broken.map_or(Ok(()), Err));
                if sent.is_ok() && burst.len() == *window {
                    *window = (*window * 2).min(WINDOW);
                }
                sent
            }
            Err(e) => Err(nats(e)),
        };
        if let Err(e) = sent {
            // Nothing more is taken from this pull. What it last asked for
            // may still come until the ask expires: the consumer is reset
            // only after that, so that no report of it is still on its way
            // when the next run starts.
            drop(pull);
            tokio::time::sleep(PULL_EXPIRES).await;
            return if forwarded { Ok(()) } else { Err(e) };
        }
        forwarded = true;
    }
    Ok(())
}

/// The hub's side of forwarding: the same connection, as a client (the
/// first reports of a batch, which get no acknowledgement of their own) and
/// as JetStream (what is acknowledged).
struct Hub {
    client: async_nats::Client,
    js: jetstream::Context,
}

/// A report as it goes to the hub.
struct Forwarded<'a> {
    subject: String,
    headers: async_nats::HeaderMap,
    message: &'a jetstream::Message,
}

/// Publishes `burst` to the hub and acknowledges in the node's stream up to
/// the last report the hub stored in a row. Two reports or more go as one
/// atomic batch: stored all together or not at all, with one
/// acknowledgement and, on a hub syncing every write, one sync. A batch the
/// hub refuses because it stored one of its reports before (an earlier
/// run's batch it committed, whose acknowledgement never came) goes again
/// one report at a time, each kept once by its id.
async fn send(
    hub: &Hub,
    node: &NodeId,
    created: i128,
    burst: &[jetstream::Message],
) -> Result<(), AgentError> {
    let own = format!("{}{node}.", edge::FORWARD_PREFIX);
    let mut reports = Vec::with_capacity(burst.len());
    for m in burst {
        let seq = m.info().map_err(nats)?.stream_sequence;
        // The hub takes only this node's own reports from it; anything else
        // in its stream (written past the agent) would hold up the rest.
        let Some(subject) =
            edge::forward_subject(m.subject.as_str()).filter(|s| s.starts_with(&own))
        else {
            warn!(node_id = %node, subject = %m.subject, seq, "not this node's report; not forwarded");
            continue;
        };
        reports.push(Forwarded {
            subject,
            headers: forward_headers(m.headers.as_ref(), &forward_id(node, created, seq), seq),
            message: m,
        });
    }
    let last = burst.last();
    if reports.len() >= 2 {
        match send_batch(hub, &reports).await {
            Ok(()) => return ack(last).await,
            Err(e) if refused_as_stored(&e) => {
                debug!(node_id = %node, "a batch held a report the hub has; sent one by one");
            }
            Err(e) => return Err(nats(e)),
        }
    }
    send_each(hub, &reports, last).await
}

/// Whether the hub refused a batch because it stored one of its reports
/// before.
fn refused_as_stored(e: &jetstream::context::PublishError) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .is_some_and(|j| {
            j.error_code() == jetstream::ErrorCode::ATOMIC_PUBLISH_CONTAINS_DUPLICATE_MESSAGE
        })
}

/// Publishes `reports` as one atomic batch and awaits its commit.
async fn send_batch(
    hub: &Hub,
    reports: &[Forwarded<'_>],
) -> Result<(), jetstream::context::PublishError> {
    use jetstream::context::{PublishError, PublishErrorKind};
    let id = uuid::Uuid::new_v4().simple().to_string();
    let n = reports.len();
    for (i, r) in reports.iter().enumerate() {
        let mut headers = r.headers.clone();
        headers.insert(BATCH_ID, id.as_str());
        headers.insert(BATCH_SEQUENCE, (i + 1).to_string().as_str());
        let payload = r.message.payload.clone();
        if i + 1 < n {
            hub.client
                .publish_with_headers(r.subject.clone(), headers, payload)
                .await
                .map_err(|e| PublishError::with_source(PublishErrorKind::BrokenPipe, e))?;
        } else {
            headers.insert(BATCH_COMMIT, "1");
            hub.js
                .publish_with_headers(r.subject.clone(), headers, payload)
                .await?
                .await?;
        }
    }
    Ok(())
}

/// Publishes `reports` one by one, awaits every acknowledgement and
/// acknowledges up to the last stored in a row (`last` when all were).
async fn send_each(
    hub: &Hub,
    reports: &[Forwarded<'_>],
    last: Option<&jetstream::Message>,
) -> Result<(), AgentError> {
    let mut acks = Vec::with_capacity(reports.len());
    let mut failed = None;
    for r in reports {
        match hub
            .js
            .publish_with_headers(
                r.subject.clone(),
                r.headers.clone(),
                r.message.payload.clone(),
            )
            .await
        {
            Ok(ack) => acks.push(ack),
            Err(e) => {
                failed = Some(nats(e));
                break;
            }
        }
    }
    let mut stored = None;
    for (r, ack) in reports.iter().zip(acks) {
        if let Err(e) = ack.await {
            failed = Some(nats(e));
            break;
        }
        stored = Some(r.message);
    }
    match failed {
        Some(e) => {
            ack(stored).await?;
            Err(e)
        }
        // All stored: reports not forwarded after the last one are covered too.
        None => ack(last).await,
    }
}

/// Acknowledges `m` and everything before it in the node's stream.
async fn ack(m: Option<&jetstream::Message>) -> Result<(), AgentError> {
    match m {
        Some(m) => m.ack().await.map_err(nats),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forwarded_report_keeps_its_headers_and_says_where_it_was() {
        let mut own = async_nats::HeaderMap::new();
        own.insert("Nats-Msg-Id", "chunk-1");
        own.insert("Ud-Attempt", "2");
        let node = NodeId::new();
        let id = forward_id(&node, 0x99, 7);
        assert_eq!(id, format!("{}.99.7", edge::hex(&node)));
        let h = forward_headers(Some(&own), &id, 7);
        assert_eq!(h.get("Nats-Msg-Id").map(|v| v.as_str()), Some("chunk-1"));
        assert_eq!(h.get("Ud-Attempt").map(|v| v.as_str()), Some("2"));
        assert_eq!(h.get(edge::ORIGIN_SEQ).map(|v| v.as_str()), Some("7"));
        let bare = forward_headers(None, &id, 7);
        assert_eq!(
            bare.get("Nats-Msg-Id").map(|v| v.as_str()),
            Some(id.as_str())
        );
    }
}
