//! Offline detection: a node silent for the timeout is marked offline by an
//! event, exactly once even with several main-server instances (the append
//! expects the node's last sequence; the second instance's append conflicts).

use tracing::{info, warn};
use ud_schemas::codec::EventMeta;
use ud_schemas::{Event, Millis};

use super::view::Cluster;
use crate::node::{self, NodeCommand};
use crate::store::{EventStore, Expect, StoreError};

/// Appends `offline` for every node silent for `timeout_ms`; returns how many this instance marked.
pub async fn check(store: &EventStore, cluster: &Cluster, now: Millis, timeout_ms: i64) -> usize {
    let mut marked = 0;
    for entry in cluster.nodes.values() {
        let Ok(events) = node::decide(
            Some(&entry.node),
            NodeCommand::CheckLiveness { timeout_ms },
            now,
        ) else {
            continue;
        };
        if events.is_empty() {
            continue;
        }
        let events: Vec<Event> = events
            .into_iter()
            .map(|e| Event::Node(entry.node.id, e))
            .collect();
        match store
            .append_all(
                &events,
                &EventMeta::new("liveness"),
                Expect::LastSeq(entry.seq),
            )
            .await
        {
            Ok(_) => {
                info!(node_id = %entry.node.id, "node offline");
                marked += 1;
            }
            Err(StoreError::Conflict) => {}
            Err(e) => warn!(node_id = %entry.node.id, error = %e, "cannot mark node offline"),
        }
    }
    marked
}
