//! Offline detection: a node silent for the timeout is marked offline by an
//! event, exactly once even with several main-server instances (the append
//! expects the node's last sequence; the second instance's append conflicts).
//!
//! Heartbeats live in a stream of their own, which the view follows apart
//! from the nodes' events: after a restart of the hub or of this server, or
//! under a burst of heartbeats, the view can lag seconds behind what is
//! stored. A node the view finds silent is therefore judged again on its
//! last stored heartbeat before it is marked, and the mark names that
//! heartbeat as the last one heard.

use futures::StreamExt;
use tracing::{debug, info, warn};
use ud_schemas::codec::{self, EventMeta};
use ud_schemas::events::NodeEvent;
use ud_schemas::{streams, subjects, Event, Millis, NodeId};

use super::view::Cluster;
use crate::aggregate::{Against, ExecuteError, Repository, Retries};
use crate::node::{self, Node, NodeCommand};
use crate::store::EventStore;

/// Appends (and reads) at most this many at once.
const IN_FLIGHT: usize = 256;

/// Appends `offline` for every node silent for `timeout_ms`; returns how
/// many this instance marked.
pub async fn check(
    nodes: &Repository<Node>,
    cluster: &Cluster,
    now: Millis,
    timeout_ms: i64,
) -> usize {
    let command = NodeCommand::CheckLiveness { timeout_ms };
    let silent = |n: &Node| {
        node::decide(Some(n), command.clone(), now).is_ok_and(|events| !events.is_empty())
    };
    // Only nodes the check would change: the others cost nothing.
    let candidates: Vec<_> = cluster.nodes.values().filter(|e| silent(&e.node)).collect();
    if candidates.is_empty() {
        return 0;
    }
    let stored = last_heartbeats(nodes.store(), candidates.iter().map(|e| e.node.id)).await;
    let against: Vec<Against<Node>> = candidates
        .into_iter()
        .zip(stored)
        .filter_map(|(e, beat)| {
            let node = match beat {
                Some(beat) => node::evolve(Some(e.node.clone()), e.node.id, &beat)?,
                None => e.node.clone(),
            };
            if !silent(&node) {
                debug!(node_id = %node.id, "heard since the view's last heartbeat");
                return None;
            }
            Some(Against {
                id: node.id,
                state: Some(node),
                seq: e.seq,
                command: command.clone(),
                meta: EventMeta::new("liveness"),
            })
        })
        .collect();
    let ids: Vec<_> = against.iter().map(|a| a.id).collect();
    let mut marked = 0;
    nodes
        .execute_each(against, IN_FLIGHT, Retries(0), |i, result| match result {
            Ok(done) if !done.events.is_empty() => {
                info!(node_id = %ids[i], "node offline");
                marked += 1;
            }
            // Another instance marked it first.
            Ok(_) | Err(ExecuteError::Conflict) => {}
            Err(e) => warn!(node_id = %ids[i], error = %e, "cannot mark node offline"),
        })
        .await;
    marked
}

/// Each node's last stored heartbeat, in the order given; `None` where
/// there is none or it cannot be read (the view's then stands).
async fn last_heartbeats(
    store: &EventStore,
    ids: impl Iterator<Item = NodeId>,
) -> Vec<Option<NodeEvent>> {
    let ids: Vec<NodeId> = ids.collect();
    let stream = match store
        .jetstream()
        .get_stream_no_info(streams::HEARTBEATS)
        .await
    {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot read stored heartbeats");
            return vec![None; ids.len()];
        }
    };
    futures::stream::iter(ids)
        .map(|id| {
            let stream = &stream;
            async move {
                let m = stream
                    .direct_get_last_for_subject(subjects::node_event(&id, "heartbeat"))
                    .await
                    .map_err(|e| debug!(node_id = %id, error = %e, "no stored heartbeat read"))
                    .ok()?;
                match codec::decode_message(m.subject.as_str(), Some(&m.headers), &m.payload) {
                    Ok(env) => match env.event {
                        Event::Node(of, beat @ NodeEvent::Heartbeat(_)) if of == id => Some(beat),
                        _ => None,
                    },
                    Err(e) => {
                        warn!(node_id = %id, error = %e, "undecodable stored heartbeat");
                        None
                    }
                }
            }
        })
        .buffered(IN_FLIGHT)
        .collect()
        .await
}
