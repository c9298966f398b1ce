//! Node reports turned into commands on the platform's aggregates: the one
//! place that says what a node's word may change. The aggregates decide the
//! events; a node never writes them.

use ud_schemas::report::{Report, RunReport};
use ud_schemas::{Millis, NodeId, TaskId};

use super::Rejected;
use crate::node::NodeCommand;
use crate::task::TaskCommand;

/// What a report asks of the platform.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // one per message, never stored in bulk
pub enum Translated {
    Node(NodeCommand),
    Run(TaskId, TaskCommand),
    /// Output of a task, passed on when the task is the node's.
    Log(TaskId),
}

/// The command `node`'s report stands for, at the hub's time `now`; an
/// outcome names the attempt it is about when the report's `Ud-Attempt`
/// header says it.
pub fn command(
    node: NodeId,
    report: Report,
    now: Millis,
    attempt: Option<u32>,
) -> Result<Translated, Rejected> {
    Ok(match report {
        Report::Registered(r) => Translated::Node(NodeCommand::Register {
            name: r.name,
            labels: r.labels,
            resources: r.resources,
        }),
        // Liveness runs on the hub's clock.
        Report::Heartbeat(h) => Translated::Node(NodeCommand::Heartbeat {
            at: now,
            running_tasks: h.running_tasks,
            disk_free_mb: h.disk_free_mb,
            low_disk: h.low_disk,
            gpus: h.gpus,
        }),
        Report::Log(task) => Translated::Log(task),
        Report::Run(task, run) => Translated::Run(task, run_command(node, run, attempt)?),
    })
}

fn run_command(
    node: NodeId,
    run: RunReport,
    attempt: Option<u32>,
) -> Result<TaskCommand, Rejected> {
    let named = |other: NodeId| Rejected::Impersonation {
        sender: node.to_string(),
        named: other.to_string(),
    };
    Ok(match run {
        RunReport::Started(s) => TaskCommand::Start {
            node_id: node,
            attempt: s.attempt,
        },
        RunReport::Preparing(p) if p.node_id == node => TaskCommand::RecordPreparing {
            node_id: node,
            attempt: p.attempt,
            step: p.step,
        },
        RunReport::Prepared(p) if p.node_id == node => TaskCommand::RecordPrepared(Box::new(p)),
        RunReport::Outputs(o) if o.node_id == node => TaskCommand::RecordOutputs(Box::new(o)),
        RunReport::Preparing(p) => return Err(named(p.node_id)),
        RunReport::Prepared(p) => return Err(named(p.node_id)),
        RunReport::Outputs(o) => return Err(named(o.node_id)),
        RunReport::Succeeded(s) => TaskCommand::Succeed {
            node_id: node,
            exit_code: s.exit_code,
            attempt,
        },
        RunReport::Failed(f) => TaskCommand::Fail {
            node_id: node,
            exit_code: f.exit_code,
            reason: f.reason,
            attempt,
        },
        RunReport::Cancelled(c) => TaskCommand::ConfirmCancelled {
            node_id: node,
            reason: c.reason,
            attempt,
        },
        RunReport::TimedOut(_) => TaskCommand::TimeOut {
            node_id: node,
            attempt,
        },
    })
}

#[cfg(test)]
mod tests {
    use ud_schemas::events::*;

    use super::*;

    #[test]
    fn a_node_speaks_for_its_own_runs_on_the_hubs_clock() {
        let (node, other, task) = (NodeId::new(), NodeId::new(), TaskId::new());
        let beat = Report::Heartbeat(NodeHeartbeat {
            at: 1,
            running_tasks: 2,
            disk_free_mb: Some(3),
            low_disk: false,
            gpus: Some(vec!["GPU-1".into()]),
        });
        assert_eq!(
            command(node, beat, 99, None).ok(),
            Some(Translated::Node(NodeCommand::Heartbeat {
                at: 99,
                running_tasks: 2,
                disk_free_mb: Some(3),
                low_disk: false,
                gpus: Some(vec!["GPU-1".into()]),
            }))
        );
        let started = Report::Run(
            task,
            RunReport::Started(TaskStarted {
                at: 1,
                node_id: other,
                attempt: 4,
            }),
        );
        // The node is the one the hub says sent it, whatever the payload says.
        assert_eq!(
            command(node, started, 5, None).ok(),
            Some(Translated::Run(
                task,
                TaskCommand::Start {
                    node_id: node,
                    attempt: 4
                }
            ))
        );
        let preparing = Report::Run(
            task,
            RunReport::Preparing(TaskPreparing {
                at: 1,
                node_id: other,
                attempt: 1,
                step: "build".into(),
            }),
        );
        assert!(matches!(
            command(node, preparing, 5, None),
            Err(Rejected::Impersonation { .. })
        ));
    }
}
