//! The node lifecycle: enrollment, registration, heartbeats, going offline, revocation.

use std::collections::BTreeMap;

use ud_schemas::events::*;
use ud_schemas::{Millis, NodeId, NodeResources, NodeStatus, SchedulingMode};

/// Whether a node is heard from (see [`NodeStatus::of`]).
pub type Liveness = NodeStatus;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub id: NodeId,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub resources: Option<NodeResources>,
    pub last_seen: Option<Millis>,
    /// The last heartbeat seen when the node was declared offline.
    pub offline_after: Option<Millis>,
    pub revoked: bool,
    /// Below its free-disk threshold, as its last heartbeat said: takes no new tasks.
    pub low_disk: bool,
    /// Only active nodes take new tasks.
    pub scheduling: SchedulingMode,
    /// Free disk where tasks run, from its last heartbeat.
    pub disk_free_mb: Option<u64>,
    /// The GPU devices it saw at its last heartbeat, when it said.
    pub visible_gpus: Option<Vec<String>>,
}

impl Node {
    /// Whether the scheduler may place new tasks here (online, active, room on disk).
    pub fn takes_new_tasks(&self) -> bool {
        self.liveness() == Liveness::Online
            && self.scheduling == SchedulingMode::Active
            && !self.low_disk
    }
}

impl Node {
    /// Online unless declared offline and silent since: heartbeats after an
    /// offline decision bring a node back without another event.
    pub fn liveness(&self) -> Liveness {
        NodeStatus::of(self.revoked, self.last_seen, self.offline_after)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeCommand {
    Enroll {
        name: String,
        labels: BTreeMap<String, String>,
        secret_hash: String,
    },
    Revoke,
    Register {
        name: String,
        labels: BTreeMap<String, String>,
        resources: NodeResources,
    },
    Heartbeat {
        at: Millis,
        running_tasks: u32,
        disk_free_mb: Option<u64>,
        low_disk: bool,
        gpus: Option<Vec<String>>,
    },
    /// Marks the node offline if it has been silent for `timeout_ms`.
    CheckLiveness {
        timeout_ms: i64,
    },
    /// An operator cordons, drains or resumes the node.
    SetScheduling {
        mode: SchedulingMode,
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("unknown node")]
    Unknown,
    #[error("node already enrolled")]
    AlreadyEnrolled,
    #[error("node was revoked")]
    Revoked,
}

pub fn decide(
    node: Option<&Node>,
    command: NodeCommand,
    now: Millis,
) -> Result<Vec<NodeEvent>, NodeError> {
    let node = match (node, command) {
        (
            None,
            NodeCommand::Enroll {
                name,
                labels,
                secret_hash,
            },
        ) => {
            return Ok(vec![NodeEvent::Enrolled(NodeEnrolled {
                at: now,
                name,
                labels,
                secret_hash,
            })]);
        }
        (Some(_), NodeCommand::Enroll { .. }) => return Err(NodeError::AlreadyEnrolled),
        (None, _) => return Err(NodeError::Unknown),
        (Some(n), NodeCommand::Revoke) if n.revoked => return Ok(vec![]),
        (Some(_), NodeCommand::Revoke) => {
            return Ok(vec![NodeEvent::Revoked(NodeRevoked { at: now })])
        }
        (Some(n), _) if n.revoked => return Err(NodeError::Revoked),
        (Some(n), command) => (n, command),
    };
    match node {
        (
            _,
            NodeCommand::Register {
                name,
                labels,
                resources,
            },
        ) => Ok(vec![NodeEvent::Registered(NodeRegistered {
            at: now,
            name,
            labels,
            resources,
        })]),
        (
            _,
            NodeCommand::Heartbeat {
                at,
                running_tasks,
                disk_free_mb,
                low_disk,
                gpus,
            },
        ) => Ok(vec![NodeEvent::Heartbeat(NodeHeartbeat {
            at,
            running_tasks,
            disk_free_mb,
            low_disk,
            gpus,
        })]),
        (n, NodeCommand::CheckLiveness { timeout_ms }) => match (n.liveness(), n.last_seen) {
            (Liveness::Online, Some(seen)) if now - seen >= timeout_ms => {
                Ok(vec![NodeEvent::WentOffline(NodeWentOffline {
                    at: now,
                    last_seen: seen,
                })])
            }
            _ => Ok(vec![]),
        },
        (n, NodeCommand::SetScheduling { mode, .. }) if n.scheduling == mode => Ok(vec![]),
        (_, NodeCommand::SetScheduling { mode, reason }) => {
            Ok(vec![NodeEvent::Scheduling(NodeScheduling {
                at: now,
                mode,
                reason,
            })])
        }
        (_, NodeCommand::Enroll { .. } | NodeCommand::Revoke) => Ok(vec![]),
    }
}

pub fn evolve(node: Option<Node>, id: NodeId, event: &NodeEvent) -> Option<Node> {
    match (node, event) {
        (_, NodeEvent::Enrolled(e)) => Some(Node {
            id,
            name: e.name.clone(),
            labels: e.labels.clone(),
            resources: None,
            last_seen: None,
            offline_after: None,
            revoked: false,
            low_disk: false,
            scheduling: SchedulingMode::Active,
            disk_free_mb: None,
            visible_gpus: None,
        }),
        (None, _) => None,
        (Some(mut n), NodeEvent::Revoked(_)) => {
            n.revoked = true;
            Some(n)
        }
        (Some(mut n), NodeEvent::Registered(e)) => {
            n.name = e.name.clone();
            n.labels = e.labels.clone();
            n.resources = Some(e.resources.clone());
            n.last_seen = n.last_seen.max(Some(e.at));
            Some(n)
        }
        (Some(mut n), NodeEvent::Heartbeat(e)) => {
            if n.last_seen.is_none_or(|seen| e.at >= seen) {
                n.low_disk = e.low_disk;
                n.disk_free_mb = e.disk_free_mb;
                n.visible_gpus = e.gpus.clone();
            }
            n.last_seen = n.last_seen.max(Some(e.at));
            Some(n)
        }
        (Some(mut n), NodeEvent::WentOffline(e)) => {
            n.offline_after = n.offline_after.max(Some(e.last_seen));
            Some(n)
        }
        (Some(mut n), NodeEvent::Scheduling(e)) => {
            n.scheduling = e.mode;
            Some(n)
        }
    }
}

impl crate::aggregate::Aggregate for Node {
    type Id = NodeId;
    type Command = NodeCommand;
    type Event = NodeEvent;
    type Error = NodeError;

    const STREAM: &'static str = ud_schemas::streams::NODES;

    fn scope(id: &NodeId) -> String {
        ud_schemas::subjects::node_all(id)
    }

    fn wrap(id: NodeId, event: NodeEvent) -> ud_schemas::Event {
        ud_schemas::Event::Node(id, event)
    }

    fn unwrap(event: ud_schemas::Event) -> Option<(NodeId, NodeEvent)> {
        match event {
            ud_schemas::Event::Node(id, e) => Some((id, e)),
            _ => None,
        }
    }

    fn decide(
        state: Option<&Self>,
        command: NodeCommand,
        now: Millis,
    ) -> Result<Vec<NodeEvent>, NodeError> {
        decide(state, command, now)
    }

    fn evolve(state: Option<Self>, id: NodeId, event: &NodeEvent) -> Option<Self> {
        evolve(state, id, event)
    }

    /// A heartbeat is recorded whatever else happened to the node (it lives
    /// in a stream of its own, outside the node's concurrency scope).
    fn checked(command: &NodeCommand) -> bool {
        !matches!(command, NodeCommand::Heartbeat { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(node: Option<Node>, id: NodeId, events: &[NodeEvent]) -> Option<Node> {
        events.iter().fold(node, |n, e| evolve(n, id, e))
    }

    fn online() -> (NodeId, Option<Node>) {
        let id = NodeId::new();
        let enroll = NodeCommand::Enroll {
            name: "n1".into(),
            labels: BTreeMap::new(),
            secret_hash: "h".into(),
        };
        let node = apply(None, id, &decide(None, enroll, 0).unwrap_or_default());
        assert_eq!(node.as_ref().map(Node::liveness), Some(Liveness::Enrolled));
        let reg = NodeCommand::Register {
            name: "n1".into(),
            labels: BTreeMap::new(),
            resources: NodeResources::default(),
        };
        let events = decide(node.as_ref(), reg, 1000).unwrap_or_default();
        (id, apply(node, id, &events))
    }

    #[test]
    fn goes_offline_after_timeout_once_and_back_with_a_heartbeat() {
        let (id, node) = online();
        assert_eq!(node.as_ref().map(Node::liveness), Some(Liveness::Online));
        let early = decide(
            node.as_ref(),
            NodeCommand::CheckLiveness { timeout_ms: 90_000 },
            90_999,
        );
        assert_eq!(early, Ok(vec![]));
        let late = decide(
            node.as_ref(),
            NodeCommand::CheckLiveness { timeout_ms: 90_000 },
            91_000,
        )
        .unwrap_or_default();
        assert_eq!(late.len(), 1);
        let offline = apply(node, id, &late);
        assert_eq!(
            offline.as_ref().map(Node::liveness),
            Some(Liveness::Offline)
        );
        let again = decide(
            offline.as_ref(),
            NodeCommand::CheckLiveness { timeout_ms: 90_000 },
            200_000,
        );
        assert_eq!(again, Ok(vec![]));
        let beat = decide(
            offline.as_ref(),
            NodeCommand::Heartbeat {
                at: 200_000,
                running_tasks: 0,
                disk_free_mb: None,
                low_disk: false,
                gpus: None,
            },
            200_000,
        )
        .unwrap_or_default();
        let back = apply(offline, id, &beat);
        assert_eq!(back.as_ref().map(Node::liveness), Some(Liveness::Online));
        // A late-projected old heartbeat does not bring it back.
        let stale = NodeEvent::Heartbeat(NodeHeartbeat {
            at: 500,
            running_tasks: 0,
            disk_free_mb: None,
            low_disk: false,
            gpus: None,
        });
        let mut n = back.unwrap_or_else(|| unreachable!());
        n.offline_after = Some(300_000);
        assert_eq!(
            evolve(Some(n), id, &stale).map(|n| n.liveness()),
            Some(Liveness::Offline)
        );
    }

    #[test]
    fn cordoned_and_draining_nodes_take_no_new_tasks_until_resumed() {
        let (id, node) = online();
        let set = |n: &Option<Node>, mode: SchedulingMode| {
            decide(
                n.as_ref(),
                NodeCommand::SetScheduling {
                    mode,
                    reason: "maintenance".into(),
                },
                2000,
            )
        };
        assert!(node.as_ref().is_some_and(Node::takes_new_tasks));
        for mode in [SchedulingMode::Cordoned, SchedulingMode::Draining] {
            let events = set(&node, mode).unwrap_or_default();
            assert_eq!(events.len(), 1);
            let changed = apply(node.clone(), id, &events);
            assert!(
                !changed.as_ref().is_some_and(Node::takes_new_tasks),
                "{mode}"
            );
            // Asking again changes nothing; resuming does.
            assert_eq!(set(&changed, mode), Ok(vec![]));
            let resumed = apply(
                changed.clone(),
                id,
                &set(&changed, SchedulingMode::Active).unwrap_or_default(),
            );
            assert!(resumed.as_ref().is_some_and(Node::takes_new_tasks));
        }
        assert_eq!(
            set(&None, SchedulingMode::Cordoned),
            Err(NodeError::Unknown)
        );
    }

    #[test]
    fn unknown_and_revoked_nodes_are_refused() {
        assert_eq!(
            decide(
                None,
                NodeCommand::Heartbeat {
                    at: 1,
                    running_tasks: 0,
                    disk_free_mb: None,
                    low_disk: false,
                    gpus: None,
                },
                1
            ),
            Err(NodeError::Unknown)
        );
        let (id, node) = online();
        let revoked = apply(node, id, &[NodeEvent::Revoked(NodeRevoked { at: 5 })]);
        assert_eq!(
            revoked.as_ref().map(Node::liveness),
            Some(Liveness::Revoked)
        );
        assert_eq!(
            decide(
                revoked.as_ref(),
                NodeCommand::Heartbeat {
                    at: 6,
                    running_tasks: 0,
                    disk_free_mb: None,
                    low_disk: false,
                    gpus: None,
                },
                6
            ),
            Err(NodeError::Revoked)
        );
        assert_eq!(decide(revoked.as_ref(), NodeCommand::Revoke, 7), Ok(vec![]));
    }
}
