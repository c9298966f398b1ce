//! Offline detection: a node silent for the timeout is marked offline by an
//! event, exactly once even with several main-server instances (the append
//! expects the node's last sequence; the second instance's append conflicts).

use tracing::{info, warn};
use ud_schemas::codec::EventMeta;
use ud_schemas::Millis;

use super::view::Cluster;
use crate::aggregate::{Against, ExecuteError, Repository, Retries};
use crate::node::{self, Node, NodeCommand};

/// Appends at most this many offline events at once.
const IN_FLIGHT: usize = 256;

/// Appends `offline` for every node silent for `timeout_ms`, as the view
/// has them; returns how many this instance marked.
pub async fn check(
    nodes: &Repository<Node>,
    cluster: &Cluster,
    now: Millis,
    timeout_ms: i64,
) -> usize {
    let command = NodeCommand::CheckLiveness { timeout_ms };
    // Only nodes the check would change: the others cost nothing.
    let silent: Vec<Against<Node>> = cluster
        .nodes
        .values()
        .filter(|e| {
            node::decide(Some(&e.node), command.clone(), now).is_ok_and(|events| !events.is_empty())
        })
        .map(|e| Against {
            id: e.node.id,
            state: Some(e.node.clone()),
            seq: e.seq,
            command: command.clone(),
            meta: EventMeta::new("liveness"),
        })
        .collect();
    let ids: Vec<_> = silent.iter().map(|a| a.id).collect();
    let mut marked = 0;
    nodes
        .execute_each(silent, IN_FLIGHT, Retries(0), |i, result| match result {
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
