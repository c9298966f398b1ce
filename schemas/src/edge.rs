//! Names of everything one compute node owns, on its leaf server and on the hub.
//!
//! | what | name |
//! | --- | --- |
//! | the leaf's JetStream domain | `n<hex>` (hex = node id without dashes) |
//! | the leaf's event stream | `EDGE_<hex>`, subjects `ud.edge.<node_id>.>` |
//! | its durable source consumer | `hub`, delivering to `ud.deliver.<node_id>.events` |
//! | the hub stream sourcing all nodes | `UD_EDGE_IN` |
//! | dispatches to the node | stream `UD_DISPATCH`, subjects `ud.dispatch.<node_id>.<task_id>.<kind>`, pull consumer `node_<hex>` |
//! | the agent's inbox prefix | `_INBOX.<hex>` |
//!
//! Events a node reports are published as `ud.edge.<node_id>.<canonical suffix>`:
//! `ud.edge.<node_id>.node.heartbeat` becomes `ud.node.<node_id>.heartbeat`,
//! `ud.edge.<node_id>.task.<task_id>.started` becomes `ud.task.<task_id>.started`
//! once the hub has checked that the node may say so.

use crate::ids::NodeId;

pub const EDGE_IN: &str = "UD_EDGE_IN";
pub const DISPATCH: &str = "UD_DISPATCH";
pub const SOURCE_CONSUMER: &str = "hub";
pub const HUB_DOMAIN: &str = "hub";

pub fn hex(node: &NodeId) -> String {
    node.0.simple().to_string()
}

pub fn domain(node: &NodeId) -> String {
    format!("n{}", hex(node))
}

pub fn stream(node: &NodeId) -> String {
    format!("EDGE_{}", hex(node))
}

pub fn stream_subjects(node: &NodeId) -> String {
    format!("ud.edge.{node}.>")
}

pub fn deliver_subject(node: &NodeId) -> String {
    format!("ud.deliver.{node}.events")
}

pub fn inbox_prefix(node: &NodeId) -> String {
    format!("_INBOX.{}", hex(node))
}

pub fn dispatch_consumer(node: &NodeId) -> String {
    format!("node_{}", hex(node))
}

pub fn dispatch_filter(node: &NodeId) -> String {
    format!("ud.dispatch.{node}.>")
}

/// `run` or `cancel` for one task on one node.
pub fn dispatch_subject(node: &NodeId, task: &crate::TaskId, kind: &str) -> String {
    format!("ud.dispatch.{node}.{task}.{kind}")
}

/// The subject a node publishes an event on, in its own stream.
pub fn edge_subject(node: &NodeId, canonical: &str) -> Option<String> {
    canonical.strip_prefix("ud.").map(|rest| format!("ud.edge.{node}.{rest}"))
}

/// Splits `ud.edge.<node_id>.<rest>` into the node and the canonical subject `ud.<rest>`.
pub fn canonical_subject(edge: &str) -> Option<(NodeId, String)> {
    let rest = edge.strip_prefix("ud.edge.")?;
    let (node, tail) = rest.split_once('.')?;
    Some((node.parse().ok()?, format!("ud.{tail}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edge_subjects_round_trip() {
        let n = NodeId::new();
        let t = crate::TaskId::new();
        let canonical = crate::subjects::task_event(&t, "started");
        let edge = edge_subject(&n, &canonical).unwrap_or_default();
        assert_eq!(canonical_subject(&edge), Some((n, canonical)));
        assert_eq!(canonical_subject("ud.edge.bad.node.heartbeat"), None);
        assert!(!domain(&n).contains('-'));
    }
}
