//! What a node reports: about itself (registration, heartbeats) and about the
//! runs it was given. A node publishes each report into its own stream on
//! `ud.edge.<node_id>.<rest>`; the main server checks who sent it and turns it
//! into a command on the platform's own aggregates, which decide the events.
//!
//! On the wire a report is the CBOR payload and headers of the platform event
//! of the same name (`ud.edge.<node>.task.<task>.started` carries a
//! `task-started`), so integrations read the CDDL rules they already know.
//! Log chunks travel as `dispatch::LogChunk` on `ud.edge.<node>.log.<task>`.

use async_nats::HeaderMap;

use crate::codec::{self, CodecError, EventMeta};
use crate::events::*;
use crate::{edge, subjects, Event, NodeId, TaskId};

/// One report of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // decoded one at a time, never stored in bulk
pub enum Report {
    Registered(NodeRegistered),
    Heartbeat(NodeHeartbeat),
    Run(TaskId, RunReport),
    /// A chunk of a task's output (its payload is passed on as it came).
    Log(TaskId),
}

/// What became of a run the node was given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunReport {
    Preparing(TaskPreparing),
    Prepared(TaskPrepared),
    Started(TaskStarted),
    Outputs(TaskOutputs),
    Succeeded(TaskSucceeded),
    Failed(TaskFailed),
    TimedOut(TaskTimedOut),
    Cancelled(TaskCancelled),
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("subject {0:?} is not a node report subject")]
    Subject(String),
    #[error("node {sender} reported in the name of node {named}")]
    Impersonation { sender: NodeId, named: NodeId },
    #[error("nodes may not report {0}")]
    NotAllowed(String),
    #[error(transparent)]
    Codec(#[from] CodecError),
}

impl RunReport {
    fn into_event(self) -> TaskEvent {
        match self {
            Self::Preparing(e) => TaskEvent::Preparing(e),
            Self::Prepared(e) => TaskEvent::Prepared(e),
            Self::Started(e) => TaskEvent::Started(e),
            Self::Outputs(e) => TaskEvent::Outputs(e),
            Self::Succeeded(e) => TaskEvent::Succeeded(e),
            Self::Failed(e) => TaskEvent::Failed(e),
            Self::TimedOut(e) => TaskEvent::TimedOut(e),
            Self::Cancelled(e) => TaskEvent::Cancelled(e),
        }
    }

    fn from_event(event: TaskEvent) -> Result<Self, ReportError> {
        Ok(match event {
            TaskEvent::Preparing(e) => Self::Preparing(e),
            TaskEvent::Prepared(e) => Self::Prepared(e),
            TaskEvent::Started(e) => Self::Started(e),
            TaskEvent::Outputs(e) => Self::Outputs(e),
            TaskEvent::Succeeded(e) => Self::Succeeded(e),
            TaskEvent::Failed(e) => Self::Failed(e),
            TaskEvent::TimedOut(e) => Self::TimedOut(e),
            TaskEvent::Cancelled(e) => Self::Cancelled(e),
            other => return Err(ReportError::NotAllowed(format!("task.{}", other.name()))),
        })
    }

    /// The report's name, as in its subject.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Preparing(_) => "preparing",
            Self::Prepared(_) => "prepared",
            Self::Started(_) => "started",
            Self::Outputs(_) => "outputs",
            Self::Succeeded(_) => "succeeded",
            Self::Failed(_) => "failed",
            Self::TimedOut(_) => "timed_out",
            Self::Cancelled(_) => "cancelled",
        }
    }
}

/// The attempt a run report names in its `Ud-Attempt` header (reports of
/// older agents name none).
pub fn attempt_of(headers: Option<&HeaderMap>) -> Option<u32> {
    headers?.get(crate::headers::ATTEMPT)?.as_str().parse().ok()
}

impl Report {
    /// The subject `node` publishes this report on, in its own stream.
    pub fn subject(&self, node: &NodeId) -> String {
        match self {
            Self::Registered(_) => {
                edge::report_subject(node, &subjects::node_event(node, "registered"))
            }
            Self::Heartbeat(_) => {
                edge::report_subject(node, &subjects::node_event(node, "heartbeat"))
            }
            Self::Run(task, r) => edge::report_subject(node, &subjects::task_event(task, r.name())),
            Self::Log(task) => edge::report_subject(node, &subjects::log(task)),
        }
    }

    /// The subject, headers and payload `node` publishes (log chunks are
    /// published with [`crate::dispatch::to_cbor`] instead).
    pub fn encode(
        self,
        node: &NodeId,
        meta: &EventMeta,
    ) -> Result<(String, HeaderMap, Vec<u8>), CodecError> {
        let subject = self.subject(node);
        let event = match self {
            Self::Registered(e) => Event::Node(*node, NodeEvent::Registered(e)),
            Self::Heartbeat(e) => Event::Node(*node, NodeEvent::Heartbeat(e)),
            Self::Run(task, r) => Event::Task(task, r.into_event()),
            Self::Log(_) => return Err(CodecError::Subject(subject)),
        };
        let (headers, payload) = codec::encode_message(&event, meta)?;
        Ok((subject, headers, payload))
    }

    /// Reads what a node published on `subject` (`ud.edge.<node>.…`): the
    /// node the subject names, and its report. A report about another node
    /// is refused here; whether the node the subject names is the one that
    /// sent it is for the reader to check (the hub's source header says).
    pub fn decode(
        subject: &str,
        headers: Option<&HeaderMap>,
        payload: &[u8],
    ) -> Result<(NodeId, Report), ReportError> {
        let (node, canonical) = edge::canonical_subject(subject)
            .ok_or_else(|| ReportError::Subject(subject.to_owned()))?;
        if let Some(task) = canonical.strip_prefix(subjects::LOG_PREFIX) {
            let task = task
                .strip_prefix('.')
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| ReportError::Subject(subject.to_owned()))?;
            return Ok((node, Report::Log(task)));
        }
        let envelope = codec::decode_message(&canonical, headers, payload)?;
        let report = match envelope.event {
            Event::Node(named, _) if named != node => {
                return Err(ReportError::Impersonation {
                    sender: node,
                    named,
                })
            }
            Event::Node(_, NodeEvent::Registered(e)) => Report::Registered(e),
            Event::Node(_, NodeEvent::Heartbeat(e)) => Report::Heartbeat(e),
            Event::Node(_, other) => {
                return Err(ReportError::NotAllowed(format!("node.{}", other.name())))
            }
            Event::Task(task, e) => Report::Run(task, RunReport::from_event(e)?),
            Event::Auth(..) => return Err(ReportError::NotAllowed("token events".into())),
            Event::Secret(..) => return Err(ReportError::NotAllowed("secret events".into())),
            Event::Pipeline(..) => return Err(ReportError::NotAllowed("pipeline events".into())),
            Event::Schedule(..) => return Err(ReportError::NotAllowed("schedule events".into())),
            Event::Project(..) => return Err(ReportError::NotAllowed("project events".into())),
        };
        Ok((node, report))
    }

    /// Whether `subject` (`ud.edge.<node>.…`) carries a heartbeat.
    pub fn is_heartbeat(subject: &str) -> bool {
        subject.ends_with(".heartbeat")
    }

    /// The task a report on `subject` is about (its run or its log), read
    /// from the subject alone.
    pub fn task_of(subject: &str) -> Option<&str> {
        let rest = subject.strip_prefix(edge::REPORT_PREFIX)?;
        let (_node, rest) = rest.split_once('.')?;
        let rest = rest
            .strip_prefix("task.")
            .or_else(|| rest.strip_prefix("log."))?;
        Some(rest.split('.').next().unwrap_or(rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip_and_refuse_what_nodes_may_not_say() -> Result<(), ReportError> {
        let (node, task) = (NodeId::new(), TaskId::new());
        let started = Report::Run(
            task,
            RunReport::Started(TaskStarted {
                at: 1,
                node_id: node,
                attempt: 2,
            }),
        );
        let (subject, headers, payload) = started.clone().encode(&node, &EventMeta::new("node"))?;
        assert_eq!(subject, format!("ud.edge.{node}.task.{task}.started"));
        assert_eq!(Report::task_of(&subject), Some(task.to_string().as_str()));
        assert_eq!(
            Report::decode(&subject, Some(&headers), &payload)?,
            (node, started)
        );
        let log = format!("ud.edge.{node}.log.{task}");
        assert_eq!(Report::decode(&log, None, b"")?, (node, Report::Log(task)));
        assert_eq!(Report::task_of(&log), Some(task.to_string().as_str()));

        // A node may not decide its own task's placement.
        let assigned = Event::Task(
            task,
            TaskEvent::Assigned(TaskAssigned {
                at: 1,
                node_id: node,
                attempt: 1,
                gpus: vec![],
            }),
        );
        let (h, p) = codec::encode_message(&assigned, &EventMeta::new("node"))?;
        let subject = edge::report_subject(&node, &assigned.subject());
        assert!(matches!(
            Report::decode(&subject, Some(&h), &p),
            Err(ReportError::NotAllowed(t)) if t == "task.assigned"
        ));
        // Nor speak for another node.
        let other = NodeId::new();
        let beat = Report::Heartbeat(NodeHeartbeat {
            at: 1,
            running_tasks: 0,
            disk_free_mb: None,
            low_disk: false,
            gpus: None,
        });
        let (_, h, p) = beat.encode(&other, &EventMeta::new("node"))?;
        let forged = format!("ud.edge.{node}.node.{other}.heartbeat");
        assert!(Report::is_heartbeat(&forged));
        assert!(matches!(
            Report::decode(&forged, Some(&h), &p),
            Err(ReportError::Impersonation { sender, named }) if sender == node && named == other
        ));
        Ok(())
    }
}
