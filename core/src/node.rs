//! The node lifecycle: registration, heartbeats, going offline.

use std::collections::BTreeMap;

use ud_schemas::events::*;
use ud_schemas::{Millis, NodeId, NodeResources};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    Online,
    Offline,
}

impl Liveness {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Online => "online",
            Self::Offline => "offline",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub id: NodeId,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub resources: NodeResources,
    pub liveness: Liveness,
    pub last_seen: Millis,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeCommand {
    Register { name: String, labels: BTreeMap<String, String>, resources: NodeResources },
    Heartbeat { running_tasks: u32 },
    /// Marks the node offline if it has been silent for `timeout_ms`.
    CheckLiveness { timeout_ms: i64 },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("unknown node")]
    Unknown,
}

pub fn decide(node: Option<&Node>, command: NodeCommand, now: Millis) -> Result<Vec<NodeEvent>, NodeError> {
    match (node, command) {
        // Re-registration updates what the node declares.
        (_, NodeCommand::Register { name, labels, resources }) => {
            Ok(vec![NodeEvent::Registered(NodeRegistered { at: now, name, labels, resources })])
        }
        (None, _) => Err(NodeError::Unknown),
        (Some(_), NodeCommand::Heartbeat { running_tasks }) => {
            Ok(vec![NodeEvent::Heartbeat(NodeHeartbeat { at: now, running_tasks })])
        }
        (Some(n), NodeCommand::CheckLiveness { timeout_ms }) => {
            if n.liveness == Liveness::Online && now - n.last_seen >= timeout_ms {
                Ok(vec![NodeEvent::WentOffline(NodeWentOffline { at: now, last_seen: n.last_seen })])
            } else {
                Ok(vec![])
            }
        }
    }
}

pub fn evolve(node: Option<Node>, id: NodeId, event: &NodeEvent) -> Option<Node> {
    match (node, event) {
        (_, NodeEvent::Registered(e)) => Some(Node {
            id,
            name: e.name.clone(),
            labels: e.labels.clone(),
            resources: e.resources.clone(),
            liveness: Liveness::Online,
            last_seen: e.at,
        }),
        (Some(mut n), NodeEvent::Heartbeat(e)) => {
            n.liveness = Liveness::Online;
            n.last_seen = n.last_seen.max(e.at);
            Some(n)
        }
        (Some(mut n), NodeEvent::WentOffline(_)) => {
            n.liveness = Liveness::Offline;
            Some(n)
        }
        (None, _) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registered() -> Option<Node> {
        let id = NodeId::new();
        let cmd = NodeCommand::Register { name: "n1".into(), labels: BTreeMap::new(), resources: NodeResources::default() };
        decide(None, cmd, 1000)
            .unwrap_or_default()
            .iter()
            .fold(None, |n, e| evolve(n, id, e))
    }

    #[test]
    fn goes_offline_after_timeout_once() {
        let node = registered();
        let early = decide(node.as_ref(), NodeCommand::CheckLiveness { timeout_ms: 90_000 }, 90_999);
        assert_eq!(early, Ok(vec![]));
        let late = decide(node.as_ref(), NodeCommand::CheckLiveness { timeout_ms: 90_000 }, 91_000).unwrap_or_default();
        assert_eq!(late.len(), 1);
        let id = node.as_ref().map(|n| n.id).unwrap_or_default();
        let offline = late.iter().fold(node, |n, e| evolve(n, id, e));
        assert_eq!(offline.as_ref().map(|n| n.liveness), Some(Liveness::Offline));
        let again = decide(offline.as_ref(), NodeCommand::CheckLiveness { timeout_ms: 90_000 }, 200_000);
        assert_eq!(again, Ok(vec![]));
        let beat = NodeEvent::Heartbeat(NodeHeartbeat { at: 200_000, running_tasks: 0 });
        let back = evolve(offline, id, &beat);
        assert_eq!(back.map(|n| n.liveness), Some(Liveness::Online));
    }

    #[test]
    fn heartbeat_of_unknown_node_is_rejected() {
        assert_eq!(decide(None, NodeCommand::Heartbeat { running_tasks: 0 }, 1), Err(NodeError::Unknown));
    }
}
