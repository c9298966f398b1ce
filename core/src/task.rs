//! The task lifecycle: `decide(state, command) -> events`, `evolve(state, event) -> state`.
//!
//! ```text
//! pending -> assigned -> running -> succeeded | failed
//!    |          |           |
//!    |          +-----------+-> cancelling -> cancelled
//!    +-> cancelled
//! ```

use ud_schemas::events::*;
use ud_schemas::{Millis, NodeId, ProjectId, TaskId, TaskSpec, TaskStatus};

/// Where a task is in its life. Each state carries only what it has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskState {
    Pending,
    Assigned {
        node_id: NodeId,
        attempt: u32,
    },
    Running {
        node_id: NodeId,
        attempt: u32,
    },
    /// Its node went offline; the run (`running`: started, else still
    /// preparing) may be heard from again until `lost_at`.
    Disconnected {
        node_id: NodeId,
        attempt: u32,
        running: bool,
        lost_at: Millis,
    },
    Cancelling {
        node_id: NodeId,
        attempt: u32,
        reason: String,
    },
    Succeeded {
        exit_code: i32,
    },
    Failed {
        exit_code: Option<i32>,
        reason: String,
    },
    TimedOut,
    Cancelled {
        reason: String,
    },
}

impl TaskState {
    pub fn status(&self) -> TaskStatus {
        match self {
            Self::Pending => TaskStatus::Pending,
            Self::Assigned { .. } => TaskStatus::Assigned,
            Self::Running { .. } => TaskStatus::Running,
            Self::Disconnected { .. } => TaskStatus::Disconnected,
            Self::Cancelling { .. } => TaskStatus::Cancelling,
            Self::Succeeded { .. } => TaskStatus::Succeeded,
            Self::Failed { .. } => TaskStatus::Failed,
            Self::TimedOut => TaskStatus::TimedOut,
            Self::Cancelled { .. } => TaskStatus::Cancelled,
        }
    }

    pub fn name(&self) -> &'static str {
        self.status().as_str()
    }

    pub fn is_terminal(&self) -> bool {
        self.status().is_terminal()
    }

    /// The node holding the task's live assignment, if any.
    /// The attempt of the run under way.
    pub fn live_attempt(&self) -> Option<u32> {
        match self {
            Self::Assigned { attempt, .. }
            | Self::Running { attempt, .. }
            | Self::Disconnected { attempt, .. }
            | Self::Cancelling { attempt, .. } => Some(*attempt),
            _ => None,
        }
    }

    pub fn live_node(&self) -> Option<NodeId> {
        match self {
            Self::Assigned { node_id, .. }
            | Self::Running { node_id, .. }
            | Self::Disconnected { node_id, .. }
            | Self::Cancelling { node_id, .. } => Some(*node_id),
            _ => None,
        }
    }

    /// What a disconnected task was before its node went: what it is
    /// again when the node is back (every other state as it is).
    fn connected(&self) -> Self {
        match self {
            Self::Disconnected {
                node_id,
                attempt,
                running: true,
                ..
            } => Self::Running {
                node_id: *node_id,
                attempt: *attempt,
            },
            Self::Disconnected {
                node_id, attempt, ..
            } => Self::Assigned {
                node_id: *node_id,
                attempt: *attempt,
            },
            other => other.clone(),
        }
    }
}

/// Why a run that hit its time limit ended, in words (the read model and
/// retries say the same).
pub fn timed_out_reason(timeout_seconds: u64) -> String {
    format!("timed out after {timeout_seconds} s")
}

/// A task folded from its events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    pub id: TaskId,
    pub project: ProjectId,
    pub spec: TaskSpec,
    pub state: TaskState,
    /// Attempts started so far.
    pub attempts: u32,
    /// A retried task is not placed before this (ms since the epoch).
    pub not_before: Option<Millis>,
    /// The GPU devices (UUIDs) its live assignment holds; empty when none.
    pub gpus: Vec<String>,
    /// The node of its latest assignment, kept after it ends.
    pub last_node: Option<NodeId>,
    /// Number of events applied: grows by one with every event.
    pub version: u64,
}

#[allow(clippy::large_enum_variant)] // built once per command or event, never stored in bulk
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskCommand {
    Submit {
        project: ProjectId,
        spec: TaskSpec,
        idempotency_key: Option<String>,
    },
    Assign {
        node_id: NodeId,
        /// The node's GPU devices the run is given.
        gpus: Vec<String>,
    },
    /// The scheduler cannot place the task now: why.
    Wait {
        reason: String,
        /// What it waits on, for programs (see `TaskWaiting::kind`).
        kind: String,
    },
    /// Change the priority of a pending task.
    Reprioritize {
        priority: i32,
    },
    /// No enrolled node could ever run the task: it fails at once.
    Unschedulable {
        reason: String,
    },
    RecordPreparing {
        node_id: NodeId,
        attempt: u32,
        step: String,
    },
    RecordPrepared(Box<TaskPrepared>),
    /// The run's outputs are in the object store.
    RecordOutputs(Box<TaskOutputs>),
    Start {
        node_id: NodeId,
        attempt: u32,
    },
    /// Outcomes name the attempt they are about when the node says so
    /// (agents since sessions do): an outcome of another attempt than the
    /// live one is refused.
    Succeed {
        node_id: NodeId,
        exit_code: i32,
        attempt: Option<u32>,
    },
    Fail {
        node_id: NodeId,
        exit_code: Option<i32>,
        reason: String,
        attempt: Option<u32>,
    },
    TimeOut {
        node_id: NodeId,
        attempt: Option<u32>,
    },
    /// The task's node went offline: its run waits for it until `lost_at`.
    Disconnect {
        node_id: NodeId,
        lost_at: Millis,
    },
    /// The node of a disconnected task is back.
    Reconnect {
        node_id: NodeId,
    },
    /// The task's node went offline (and its grace, if any, is over).
    Lose {
        node_id: NodeId,
        reason: String,
    },
    Cancel {
        reason: String,
    },
    /// The node stopped the run: as asked (a cancel under way), or on its
    /// own for `reason` (a session left idle, a run cut off from the main
    /// server).
    ConfirmCancelled {
        node_id: NodeId,
        reason: String,
        attempt: Option<u32>,
    },
}

impl TaskCommand {
    /// The attempt an outcome says it is about.
    fn reported_attempt(&self) -> Option<u32> {
        match self {
            Self::Succeed { attempt, .. }
            | Self::Fail { attempt, .. }
            | Self::TimeOut { attempt, .. }
            | Self::ConfirmCancelled { attempt, .. } => *attempt,
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Submit { .. } => "submit",
            Self::Assign { .. } => "assign",
            Self::Wait { .. } => "wait",
            Self::Reprioritize { .. } => "reprioritize",
            Self::Unschedulable { .. } => "unschedulable",
            Self::RecordPreparing { .. } => "record-preparing",
            Self::RecordPrepared(_) => "record-prepared",
            Self::RecordOutputs(_) => "record-outputs",
            Self::Start { .. } => "start",
            Self::Succeed { .. } => "succeed",
            Self::Fail { .. } => "fail",
            Self::TimeOut { .. } => "time-out",
            Self::Disconnect { .. } => "disconnect",
            Self::Reconnect { .. } => "reconnect",
            Self::Lose { .. } => "lose",
            Self::Cancel { .. } => "cancel",
            Self::ConfirmCancelled { .. } => "confirm-cancelled",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TaskError {
    #[error("task not found")]
    NotFound,
    #[error("task already exists")]
    AlreadyExists,
    #[error("task is {state}; cannot {command}")]
    InvalidTransition {
        state: &'static str,
        command: &'static str,
    },
    #[error("task is not assigned to node {0}")]
    WrongNode(NodeId),
    #[error("an outcome of attempt {reported}, but the task's attempt is {live}")]
    StaleAttempt { reported: u32, live: u32 },
}

/// Decides which events a command produces, without side effects.
pub fn decide(
    task: Option<&Task>,
    command: TaskCommand,
    now: Millis,
) -> Result<Vec<TaskEvent>, TaskError> {
    let Some(task) = task else {
        return match command {
            TaskCommand::Submit {
                project,
                spec,
                idempotency_key,
            } => Ok(vec![TaskEvent::Submitted(TaskSubmitted {
                at: now,
                project,
                spec,
                idempotency_key,
            })]),
            _ => Err(TaskError::NotFound),
        };
    };
    let invalid = |command: &TaskCommand| TaskError::InvalidTransition {
        state: task.state.name(),
        command: command.name(),
    };
    let check_node = |node: &NodeId| match task.state.live_node() {
        Some(live) if live == *node => Ok(()),
        _ => Err(TaskError::WrongNode(*node)),
    };
    // A disconnected run is judged as the run it was: whatever its node
    // reports once it is back counts as before.
    if let (Some(reported), Some(live)) = (command.reported_attempt(), task.state.live_attempt()) {
        if reported != live {
            return Err(TaskError::StaleAttempt { reported, live });
        }
    }
    let disconnected = matches!(task.state, TaskState::Disconnected { .. });
    let state = task.state.connected();
    match (&state, command) {
        (_, TaskCommand::Submit { .. }) => Err(TaskError::AlreadyExists),
        (
            TaskState::Assigned { node_id, attempt } | TaskState::Running { node_id, attempt },
            TaskCommand::Disconnect {
                node_id: gone,
                lost_at,
            },
        ) if *node_id == gone => Ok(if disconnected {
            vec![]
        } else {
            vec![TaskEvent::Disconnected(TaskDisconnected {
                at: now,
                node_id: gone,
                attempt: *attempt,
                lost_at,
            })]
        }),
        (
            TaskState::Assigned { node_id, attempt } | TaskState::Running { node_id, attempt },
            TaskCommand::Reconnect { node_id: back },
        ) if *node_id == back => Ok(if disconnected {
            vec![TaskEvent::Reconnected(TaskReconnected {
                at: now,
                node_id: back,
                attempt: *attempt,
                running: matches!(state, TaskState::Running { .. }),
            })]
        } else {
            vec![]
        }),
        (_, TaskCommand::Disconnect { node_id, .. } | TaskCommand::Reconnect { node_id }) => {
            Err(TaskError::WrongNode(node_id))
        }
        (TaskState::Pending, TaskCommand::Assign { node_id, gpus }) => {
            Ok(vec![TaskEvent::Assigned(TaskAssigned {
                at: now,
                node_id,
                attempt: task.attempts + 1,
                gpus,
            })])
        }
        (
            TaskState::Assigned {
                node_id: live,
                attempt: a,
            },
            TaskCommand::RecordPrepared(p),
        ) if *live == p.node_id && *a == p.attempt => {
            Ok(vec![TaskEvent::Prepared(TaskPrepared { at: now, ..*p })])
        }
        (TaskState::Assigned { .. }, TaskCommand::RecordPrepared(p)) => {
            Err(TaskError::WrongNode(p.node_id))
        }
        (
            TaskState::Assigned {
                node_id: live,
                attempt: a,
            },
            TaskCommand::RecordPreparing {
                node_id,
                attempt,
                step,
            },
        ) if *live == node_id && *a == attempt => Ok(vec![TaskEvent::Preparing(TaskPreparing {
            at: now,
            node_id,
            attempt,
            step,
        })]),
        (TaskState::Assigned { .. }, TaskCommand::RecordPreparing { node_id, .. }) => {
            Err(TaskError::WrongNode(node_id))
        }
        (
            TaskState::Assigned {
                node_id: live,
                attempt: a,
            },
            TaskCommand::Start { node_id, attempt },
        ) if *live == node_id && *a == attempt => Ok(vec![TaskEvent::Started(TaskStarted {
            at: now,
            node_id,
            attempt,
        })]),
        (TaskState::Assigned { .. }, c @ TaskCommand::Start { .. }) => Err(invalid(&c)),
        // Said again by an agent that adopted the run after a restart and
        // cannot know whether its first word arrived: nothing new.
        (
            TaskState::Running {
                node_id: live,
                attempt: a,
            }
            | TaskState::Cancelling {
                node_id: live,
                attempt: a,
                ..
            },
            TaskCommand::Start { node_id, attempt },
        ) if *live == node_id && *a == attempt => Ok(vec![]),
        (
            TaskState::Running {
                node_id: live,
                attempt: a,
            }
            | TaskState::Cancelling {
                node_id: live,
                attempt: a,
                ..
            },
            TaskCommand::RecordOutputs(o),
        ) if *live == o.node_id && *a == o.attempt => {
            Ok(vec![TaskEvent::Outputs(TaskOutputs { at: now, ..*o })])
        }
        (
            TaskState::Running { .. } | TaskState::Cancelling { .. },
            TaskCommand::RecordOutputs(o),
        ) => Err(TaskError::WrongNode(o.node_id)),
        (
            TaskState::Assigned { .. } | TaskState::Running { .. } | TaskState::Cancelling { .. },
            TaskCommand::Succeed {
                node_id, exit_code, ..
            },
        ) => {
            check_node(&node_id)?;
            Ok(vec![TaskEvent::Succeeded(TaskSucceeded {
                at: now,
                exit_code,
            })])
        }
        (
            TaskState::Assigned { .. } | TaskState::Running { .. } | TaskState::Cancelling { .. },
            TaskCommand::Fail {
                node_id,
                exit_code,
                reason,
                ..
            },
        ) => {
            check_node(&node_id)?;
            let attempt = match &state {
                TaskState::Assigned { attempt, .. } | TaskState::Running { attempt, .. } => {
                    Some(*attempt)
                }
                _ => None,
            };
            // A failed run is retried while its policy allows (a cancelled one is not).
            let policy = &task.spec.retry;
            let counts = policy.exit_codes.is_empty()
                || exit_code.is_some_and(|c| policy.exit_codes.contains(&c));
            match attempt {
                Some(attempt) if attempt < policy.max_attempts && counts => {
                    let backoff = i64::from(task.spec.retry.backoff_seconds).saturating_mul(1000);
                    Ok(vec![TaskEvent::Retrying(TaskRetrying {
                        at: now,
                        attempt,
                        exit_code,
                        reason,
                        not_before: now.saturating_add(backoff),
                    })])
                }
                _ => Ok(vec![TaskEvent::Failed(TaskFailed {
                    at: now,
                    exit_code,
                    reason,
                })]),
            }
        }
        (
            TaskState::Assigned { attempt, .. } | TaskState::Running { attempt, .. },
            TaskCommand::TimeOut { node_id, .. },
        ) => {
            check_node(&node_id)?;
            let policy = &task.spec.retry;
            if policy.on_timeout && *attempt < policy.max_attempts {
                let backoff = i64::from(policy.backoff_seconds).saturating_mul(1000);
                let reason = timed_out_reason(task.spec.timeout_seconds);
                return Ok(vec![TaskEvent::Retrying(TaskRetrying {
                    at: now,
                    attempt: *attempt,
                    exit_code: None,
                    reason,
                    not_before: now.saturating_add(backoff),
                })]);
            }
            Ok(vec![TaskEvent::TimedOut(TaskTimedOut {
                at: now,
                timeout_seconds: task.spec.timeout_seconds,
            })])
        }
        (TaskState::Pending, TaskCommand::Reprioritize { priority })
            if priority == task.spec.priority =>
        {
            Ok(vec![])
        }
        (TaskState::Pending, TaskCommand::Reprioritize { priority }) => {
            Ok(vec![TaskEvent::Reprioritized(TaskReprioritized {
                at: now,
                priority,
            })])
        }
        (TaskState::Pending, TaskCommand::Wait { reason, kind }) => {
            Ok(vec![TaskEvent::Waiting(TaskWaiting {
                at: now,
                reason,
                kind: Some(kind),
            })])
        }
        (TaskState::Pending, TaskCommand::Unschedulable { reason }) => {
            Ok(vec![TaskEvent::Failed(TaskFailed {
                at: now,
                exit_code: None,
                reason: format!("cannot be scheduled: {reason}"),
            })])
        }
        (
            TaskState::Assigned { node_id, attempt } | TaskState::Running { node_id, attempt },
            TaskCommand::Lose {
                node_id: lost,
                reason,
            },
        ) if *node_id == lost => Ok(vec![TaskEvent::Lost(TaskLost {
            at: now,
            node_id: lost,
            attempt: *attempt,
            reason,
        })]),
        // A cancel under way ends with the node that would have confirmed it.
        (
            TaskState::Cancelling {
                node_id, reason, ..
            },
            TaskCommand::Lose { node_id: lost, .. },
        ) if *node_id == lost => Ok(vec![TaskEvent::Cancelled(TaskCancelled {
            at: now,
            reason: reason.clone(),
        })]),
        (_, TaskCommand::Lose { node_id, .. }) => Err(TaskError::WrongNode(node_id)),
        (TaskState::Pending, TaskCommand::Cancel { reason }) => {
            Ok(vec![TaskEvent::Cancelled(TaskCancelled {
                at: now,
                reason,
            })])
        }
        (
            TaskState::Assigned { .. } | TaskState::Running { .. },
            TaskCommand::Cancel { reason },
        ) => Ok(vec![TaskEvent::CancelRequested(TaskCancelRequested {
            at: now,
            reason,
        })]),
        // Asking again while a cancel is under way changes nothing.
        (TaskState::Cancelling { .. }, TaskCommand::Cancel { .. }) => Ok(vec![]),
        (TaskState::Cancelling { reason, .. }, TaskCommand::ConfirmCancelled { node_id, .. }) => {
            check_node(&node_id)?;
            Ok(vec![TaskEvent::Cancelled(TaskCancelled {
                at: now,
                reason: reason.clone(),
            })])
        }
        (
            TaskState::Assigned { .. } | TaskState::Running { .. },
            TaskCommand::ConfirmCancelled {
                node_id, reason, ..
            },
        ) => {
            check_node(&node_id)?;
            Ok(vec![TaskEvent::Cancelled(TaskCancelled {
                at: now,
                reason,
            })])
        }
        (_, c) => Err(invalid(&c)),
    }
}

/// Applies one event. Holds no business rules: an event that does not fit
/// the state (which `decide` never produces) leaves the state unchanged.
pub fn evolve(task: Option<Task>, id: TaskId, event: &TaskEvent) -> Option<Task> {
    let Some(mut task) = task else {
        return match event {
            TaskEvent::Submitted(e) => Some(Task {
                id,
                project: e.project.clone(),
                spec: e.spec.clone(),
                state: TaskState::Pending,
                attempts: 0,
                not_before: None,
                gpus: Vec::new(),
                last_node: None,
                version: 1,
            }),
            _ => None,
        };
    };
    task.version += 1;
    if task.state.is_terminal() {
        return Some(task);
    }
    task.state = match (
        std::mem::replace(&mut task.state, TaskState::Pending),
        event,
    ) {
        (_, TaskEvent::Assigned(e)) => {
            task.attempts = e.attempt;
            task.gpus = e.gpus.clone();
            task.last_node = Some(e.node_id);
            TaskState::Assigned {
                node_id: e.node_id,
                attempt: e.attempt,
            }
        }
        (_, TaskEvent::Started(e)) => TaskState::Running {
            node_id: e.node_id,
            attempt: e.attempt,
        },
        (_, TaskEvent::Succeeded(e)) => TaskState::Succeeded {
            exit_code: e.exit_code,
        },
        (_, TaskEvent::Failed(e)) => TaskState::Failed {
            exit_code: e.exit_code,
            reason: e.reason.clone(),
        },
        (_, TaskEvent::TimedOut(_)) => TaskState::TimedOut,
        (_, TaskEvent::Lost(_)) => TaskState::Pending,
        (TaskState::Assigned { node_id, attempt }, TaskEvent::Disconnected(e)) => {
            TaskState::Disconnected {
                node_id,
                attempt,
                running: false,
                lost_at: e.lost_at,
            }
        }
        (TaskState::Running { node_id, attempt }, TaskEvent::Disconnected(e)) => {
            TaskState::Disconnected {
                node_id,
                attempt,
                running: true,
                lost_at: e.lost_at,
            }
        }
        (state @ TaskState::Disconnected { .. }, TaskEvent::Reconnected(_)) => state.connected(),
        (state, TaskEvent::Reprioritized(e)) => {
            task.spec.priority = e.priority;
            state
        }
        (_, TaskEvent::Retrying(e)) => {
            task.not_before = Some(e.not_before);
            TaskState::Pending
        }
        (_, TaskEvent::Cancelled(e)) => TaskState::Cancelled {
            reason: e.reason.clone(),
        },
        (
            TaskState::Assigned { node_id, attempt }
            | TaskState::Running { node_id, attempt }
            | TaskState::Disconnected {
                node_id, attempt, ..
            },
            TaskEvent::CancelRequested(e),
        ) => TaskState::Cancelling {
            node_id,
            attempt,
            reason: e.reason.clone(),
        },
        (
            state,
            TaskEvent::CancelRequested(_)
            | TaskEvent::Submitted(_)
            | TaskEvent::Waiting(_)
            | TaskEvent::Preparing(_)
            | TaskEvent::Prepared(_)
            | TaskEvent::Outputs(_)
            | TaskEvent::Disconnected(_)
            | TaskEvent::Reconnected(_),
        ) => state,
    };
    // Devices are held only by a live assignment.
    if task.state.live_node().is_none() {
        task.gpus.clear();
    }
    Some(task)
}

/// Folds a whole history.
pub fn fold<'a>(id: TaskId, events: impl IntoIterator<Item = &'a TaskEvent>) -> Option<Task> {
    events.into_iter().fold(None, |task, e| evolve(task, id, e))
}

#[cfg(test)]
pub(crate) mod tests;

impl crate::aggregate::Aggregate for Task {
    type Id = TaskId;
    type Command = TaskCommand;
    type Event = TaskEvent;
    type Error = TaskError;

    const STREAM: &'static str = ud_schemas::streams::TASKS;

    fn scope(id: &TaskId) -> String {
        ud_schemas::subjects::task_all(id)
    }

    fn wrap(id: TaskId, event: TaskEvent) -> ud_schemas::Event {
        ud_schemas::Event::Task(id, event)
    }

    fn unwrap(event: ud_schemas::Event) -> Option<(TaskId, TaskEvent)> {
        match event {
            ud_schemas::Event::Task(id, e) => Some((id, e)),
            _ => None,
        }
    }

    fn decide(
        state: Option<&Self>,
        command: TaskCommand,
        now: Millis,
    ) -> Result<Vec<TaskEvent>, TaskError> {
        decide(state, command, now)
    }

    fn evolve(state: Option<Self>, id: TaskId, event: &TaskEvent) -> Option<Self> {
        evolve(state, id, event)
    }

    fn settled(&self) -> bool {
        self.state.is_terminal()
    }
}
