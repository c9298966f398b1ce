use std::collections::BTreeMap;

use proptest::prelude::*;
use ud_schemas::spec::{Resources, RetryPolicy};

use super::*;

pub(crate) fn spec() -> TaskSpec {
    TaskSpec {
        name: None,
        code_repo_url: "https://example.org/code.git".into(),
        code_commit_id: "a".repeat(40),
        env_repo_url: "https://example.org/env.git".into(),
        env_commit_id: "b".repeat(40),
        dockerfile_path: "Dockerfile".into(),
        command: vec!["true".into()],
        args: vec![],
        env: BTreeMap::new(),
        resources: Resources {
            cpu_millis: 1000,
            memory_mb: 512,
            gpus: 0,
            gpu_model: None,
            labels: BTreeMap::new(),
            preferred_labels: BTreeMap::new(),
            disk_mb: 0,
            gpu_memory_mb: 0,
            gpu_compute_capability: None,
            gpu_driver: None,
            gpu_shared: false,
            network: Default::default(),
            preferred_nodes: Vec::new(),
        },
        timeout_seconds: 60,
        retry: RetryPolicy {
            max_attempts: 1,
            backoff_seconds: 0,
            exit_codes: vec![],
            on_timeout: false,
        },
        priority: 0,
        queue: "default".into(),
        inputs: vec![],
        outputs: vec![],
        shm_size_mb: None,
        secrets: vec![],
        checkpoint: None,
        lost_after_seconds: None,
        after: vec![],
        shared: None,
        store: None,
        ports: vec![],
        session: None,
        image: None,
    }
}

fn project() -> ProjectId {
    ProjectId::parse("lab").unwrap_or_else(|e| unreachable!("{e}"))
}

/// given(events).when(command).then(events) / then_err(error)
struct Given {
    id: TaskId,
    task: Option<Task>,
}

fn given(commands: &[TaskCommand]) -> Given {
    let id = TaskId::new();
    let mut task = None;
    for c in commands {
        let events =
            decide(task.as_ref(), c.clone(), 1).unwrap_or_else(|e| unreachable!("given: {e}"));
        for e in &events {
            task = evolve(task, id, e);
        }
    }
    Given { id, task }
}

impl Given {
    fn when(self, command: TaskCommand) -> (Given, Result<Vec<TaskEvent>, TaskError>) {
        let r = decide(self.task.as_ref(), command, 2);
        (self, r)
    }
}

fn submit() -> TaskCommand {
    TaskCommand::Submit {
        project: project(),
        spec: spec(),
        idempotency_key: None,
    }
}

#[test]
fn submit_creates_pending_task() {
    let (g, r) = given(&[]).when(submit());
    let events = r.unwrap_or_default();
    assert_eq!(events.len(), 1);
    let task = fold(g.id, &events).unwrap_or_else(|| unreachable!());
    assert_eq!(task.state, TaskState::Pending);
    assert_eq!(task.version, 1);
}

#[test]
fn submit_twice_is_rejected() {
    let (_, r) = given(&[submit()]).when(submit());
    assert_eq!(r, Err(TaskError::AlreadyExists));
}

#[test]
fn cancel_pending_cancels_at_once() {
    let (_, r) = given(&[submit()]).when(TaskCommand::Cancel {
        reason: "no".into(),
    });
    assert!(matches!(r.as_deref(), Ok([TaskEvent::Cancelled(_)])));
}

#[test]
fn cancel_running_asks_the_node() {
    let node = NodeId::new();
    let (_, r) = given(&running_on(node)).when(TaskCommand::Cancel {
        reason: "no".into(),
    });
    assert!(matches!(r.as_deref(), Ok([TaskEvent::CancelRequested(_)])));
}

#[test]
fn a_node_may_stop_its_own_run_and_say_why() {
    let node = NodeId::new();
    let running = running_on(node);
    let stop = |node_id| TaskCommand::ConfirmCancelled {
        node_id,
        reason: "ended after 60 min without session traffic".into(),
        attempt: None,
    };
    let (_, r) = given(&running).when(stop(node));
    match r.as_deref() {
        Ok([TaskEvent::Cancelled(c)]) => assert!(c.reason.contains("session traffic")),
        other => unreachable!("{other:?}"),
    }
    let other = NodeId::new();
    let (_, r) = given(&running).when(stop(other));
    assert_eq!(r, Err(TaskError::WrongNode(other)));
}

#[test]
fn an_outcome_of_another_attempt_changes_nothing() {
    let node = NodeId::new();
    let running = running_on(node);
    let succeed = |attempt| TaskCommand::Succeed {
        node_id: node,
        exit_code: 0,
        attempt,
    };
    let (_, r) = given(&running).when(succeed(Some(2)));
    assert_eq!(
        r,
        Err(TaskError::StaleAttempt {
            reported: 2,
            live: 1
        })
    );
    for ok in [Some(1), None] {
        let (_, r) = given(&running).when(succeed(ok));
        assert!(
            matches!(r.as_deref(), Ok([TaskEvent::Succeeded(_)])),
            "{ok:?}"
        );
    }
}

#[test]
fn cancel_finished_task_is_rejected() {
    let node = NodeId::new();
    let (_, r) = given(&[
        submit(),
        TaskCommand::Assign {
            node_id: node,
            gpus: vec![],
        },
        TaskCommand::Succeed {
            node_id: node,
            exit_code: 0,
            attempt: None,
        },
    ])
    .when(TaskCommand::Cancel {
        reason: "late".into(),
    });
    assert_eq!(
        r,
        Err(TaskError::InvalidTransition {
            state: "succeeded",
            command: "cancel"
        })
    );
}

#[test]
fn other_node_cannot_report() {
    let node = NodeId::new();
    let other = NodeId::new();
    let (_, r) = given(&[
        submit(),
        TaskCommand::Assign {
            node_id: node,
            gpus: vec![],
        },
    ])
    .when(TaskCommand::Succeed {
        node_id: other,
        exit_code: 0,
        attempt: None,
    });
    assert_eq!(r, Err(TaskError::WrongNode(other)));
}

#[test]
fn unknown_task_cannot_be_cancelled() {
    let (_, r) = given(&[]).when(TaskCommand::Cancel { reason: "x".into() });
    assert_eq!(r, Err(TaskError::NotFound));
}

fn command_strategy(nodes: Vec<NodeId>) -> impl Strategy<Value = TaskCommand> {
    let n = nodes.len();
    let pick = move |i: usize| nodes[i % n];
    (0u8..11, 0usize..8, 0u32..3, -2i32..3).prop_map(move |(kind, node, attempt, code)| {
        let node_id = pick(node);
        match kind {
            0 => TaskCommand::Submit {
                project: project(),
                spec: spec(),
                idempotency_key: None,
            },
            1 => TaskCommand::Assign {
                node_id,
                gpus: vec![],
            },
            2 => TaskCommand::Start { node_id, attempt },
            3 => TaskCommand::Succeed {
                node_id,
                exit_code: code,
                attempt: None,
            },
            4 => TaskCommand::Fail {
                node_id,
                exit_code: Some(code),
                reason: "boom".into(),
                attempt: None,
            },
            5 => TaskCommand::Cancel {
                reason: "stop".into(),
            },
            6 => TaskCommand::TimeOut {
                node_id,
                attempt: None,
            },
            7 => TaskCommand::Disconnect {
                node_id,
                lost_at: 100,
            },
            8 => TaskCommand::Reconnect { node_id },
            9 => TaskCommand::Lose {
                node_id,
                reason: "gone".into(),
            },
            _ => TaskCommand::ConfirmCancelled {
                node_id,
                reason: "stopped".into(),
                attempt: None,
            },
        }
    })
}

proptest! {
    /// Over random command sequences: a terminal task never changes state,
    /// a task never has two live assignments, versions only grow, and
    /// folding the produced events gives the same state as applying them
    /// one by one.
    #[test]
    fn lifecycle_invariants(cmds in proptest::collection::vec(command_strategy((0..3).map(|_| NodeId::new()).collect()), 0..40)) {
        let id = TaskId::new();
        let mut task: Option<Task> = None;
        let mut history: Vec<TaskEvent> = Vec::new();
        for (i, cmd) in cmds.into_iter().enumerate() {
            let before = task.clone();
            match decide(task.as_ref(), cmd, i as i64) {
                Ok(events) => {
                    if let Some(t) = &before {
                        if t.state.is_terminal() {
                            prop_assert!(events.is_empty(), "terminal task produced {events:?}");
                        }
                    }
                    for e in &events {
                        let prev_version = task.as_ref().map_or(0, |t| t.version);
                        task = evolve(task, id, e);
                        let t = task.as_ref();
                        prop_assert!(t.is_some());
                        prop_assert_eq!(t.map_or(0, |t| t.version), prev_version + 1);
                        history.push(e.clone());
                    }
                    // At most one live assignment: a new assignment only from pending.
                    let assigns = events.iter().filter(|e| matches!(e, TaskEvent::Assigned(_))).count();
                    if assigns > 0 {
                        prop_assert_eq!(before.as_ref().map(|t| &t.state), Some(&TaskState::Pending));
                    }
                }
                Err(_) => prop_assert_eq!(&task, &before),
            }
            if let (Some(b), Some(a)) = (&before, &task) {
                if b.state.is_terminal() {
                    prop_assert_eq!(&b.state, &a.state);
                }
            }
        }
        prop_assert_eq!(fold(id, &history), task);
    }
}

fn running_on(node: NodeId) -> Vec<TaskCommand> {
    vec![
        submit(),
        TaskCommand::Assign {
            node_id: node,
            gpus: vec!["GPU-a".into()],
        },
        TaskCommand::Start {
            node_id: node,
            attempt: 1,
        },
    ]
}

#[test]
fn a_start_said_again_for_the_running_attempt_changes_nothing() {
    let node = NodeId::new();
    let g = given(&running_on(node));
    let (g, r) = g.when(TaskCommand::Start {
        node_id: node,
        attempt: 1,
    });
    assert_eq!(r, Ok(vec![]));
    // Another attempt, or another node, is still refused.
    let (g, r) = g.when(TaskCommand::Start {
        node_id: node,
        attempt: 2,
    });
    assert!(r.is_err(), "{r:?}");
    let (_, r) = g.when(TaskCommand::Start {
        node_id: NodeId::new(),
        attempt: 1,
    });
    assert!(r.is_err(), "{r:?}");
}

#[test]
fn a_disconnected_run_keeps_its_node_and_goes_on_when_it_is_back() {
    let node = NodeId::new();
    let mut history = running_on(node);
    history.push(TaskCommand::Disconnect {
        node_id: node,
        lost_at: 600,
    });
    let g = given(&history);
    let task = g.task.clone().unwrap_or_else(|| unreachable!());
    assert_eq!(task.state.name(), "disconnected");
    // Still holds its node and devices.
    assert_eq!(task.state.live_node(), Some(node));
    assert_eq!(task.gpus, vec!["GPU-a".to_owned()]);
    // Asked again: nothing new.
    let (g, r) = g.when(TaskCommand::Disconnect {
        node_id: node,
        lost_at: 900,
    });
    assert_eq!(r, Ok(vec![]));
    // Back: running again, the same attempt.
    let (g, r) = g.when(TaskCommand::Reconnect { node_id: node });
    let events = r.unwrap_or_default();
    assert!(
        matches!(events.as_slice(), [TaskEvent::Reconnected(e)] if e.running && e.attempt == 1),
        "{events:?}"
    );
    let back = evolve(g.task, g.id, &events[0]).unwrap_or_else(|| unreachable!());
    assert_eq!(
        back.state,
        TaskState::Running {
            node_id: node,
            attempt: 1
        }
    );
}

#[test]
fn what_a_disconnected_node_reports_once_back_counts() {
    let node = NodeId::new();
    let mut history = running_on(node);
    history.push(TaskCommand::Disconnect {
        node_id: node,
        lost_at: 600,
    });
    let (_, r) = given(&history).when(TaskCommand::Succeed {
        node_id: node,
        exit_code: 0,
        attempt: None,
    });
    assert!(matches!(r.as_deref(), Ok([TaskEvent::Succeeded(_)])));
    // Another node cannot.
    let (_, r) = given(&history).when(TaskCommand::Succeed {
        node_id: NodeId::new(),
        exit_code: 0,
        attempt: None,
    });
    assert!(matches!(r, Err(TaskError::WrongNode(_))));
    // A failure is retried as it would have been.
    let (_, r) = given(&history).when(TaskCommand::Fail {
        node_id: node,
        exit_code: Some(1),
        reason: "x".into(),
        attempt: None,
    });
    assert!(matches!(
        r.as_deref(),
        Ok([TaskEvent::Failed(_)] | [TaskEvent::Retrying(_)])
    ));
}

#[test]
fn a_disconnected_run_past_its_grace_is_lost_and_frees_its_devices() {
    let node = NodeId::new();
    let mut history = running_on(node);
    history.push(TaskCommand::Disconnect {
        node_id: node,
        lost_at: 600,
    });
    let (g, r) = given(&history).when(TaskCommand::Lose {
        node_id: node,
        reason: "node went offline".into(),
    });
    let events = r.unwrap_or_default();
    assert!(matches!(events.as_slice(), [TaskEvent::Lost(l)] if l.attempt == 1));
    let task = evolve(g.task, g.id, &events[0]).unwrap_or_else(|| unreachable!());
    assert_eq!(task.state, TaskState::Pending);
    assert!(task.gpus.is_empty());
    // Disconnect and reconnect name the task's own node only.
    let (_, r) = given(&running_on(node)).when(TaskCommand::Disconnect {
        node_id: NodeId::new(),
        lost_at: 1,
    });
    assert!(matches!(r, Err(TaskError::WrongNode(_))));
    // A pending task has no node to wait for.
    let (_, r) = given(&[submit()]).when(TaskCommand::Reconnect { node_id: node });
    assert!(matches!(r, Err(TaskError::WrongNode(_))));
}

#[test]
fn failed_runs_are_retried_while_the_policy_allows_then_fail() {
    let node = NodeId::new();
    let mut s = spec();
    s.retry = RetryPolicy {
        max_attempts: 2,
        backoff_seconds: 30,
        exit_codes: vec![],
        on_timeout: false,
    };
    let retried_submit = TaskCommand::Submit {
        project: project(),
        spec: s,
        idempotency_key: None,
    };
    let fail = || TaskCommand::Fail {
        node_id: node,
        exit_code: Some(3),
        reason: "exited with code 3".into(),
        attempt: None,
    };
    let run = [
        retried_submit,
        TaskCommand::Assign {
            node_id: node,
            gpus: vec![],
        },
        TaskCommand::Start {
            node_id: node,
            attempt: 1,
        },
    ];
    let (g, r) = given(&run).when(fail());
    let events = r.unwrap_or_default();
    assert!(
        matches!(
            events.as_slice(),
            [TaskEvent::Retrying(TaskRetrying {
                attempt: 1,
                exit_code: Some(3),
                not_before: 30_002,
                ..
            })]
        ),
        "{events:?}"
    );
    let task = events.iter().fold(g.task, |t, e| evolve(t, g.id, e));
    assert_eq!(
        task.as_ref().map(|t| (&t.state, t.not_before)),
        Some((&TaskState::Pending, Some(30_002)))
    );
    // The second attempt is the last one.
    let mut task = task;
    for c in [
        TaskCommand::Assign {
            node_id: node,
            gpus: vec![],
        },
        TaskCommand::Start {
            node_id: node,
            attempt: 2,
        },
    ] {
        let events = decide(task.as_ref(), c, 3).unwrap_or_default();
        task = events.iter().fold(task, |t, e| evolve(t, g.id, e));
    }
    let last = decide(task.as_ref(), fail(), 4).unwrap_or_default();
    assert!(
        matches!(last.as_slice(), [TaskEvent::Failed(_)]),
        "{last:?}"
    );
    // Only the listed exit codes count; time-outs only when asked for.
    let mut picky = spec();
    picky.retry = RetryPolicy {
        max_attempts: 3,
        backoff_seconds: 0,
        exit_codes: vec![75],
        on_timeout: true,
    };
    let picky_run = [
        TaskCommand::Submit {
            project: project(),
            spec: picky,
            idempotency_key: None,
        },
        TaskCommand::Assign {
            node_id: node,
            gpus: vec![],
        },
        TaskCommand::Start {
            node_id: node,
            attempt: 1,
        },
    ];
    let (_, r) = given(&picky_run).when(fail());
    assert!(
        matches!(r.as_deref(), Ok([TaskEvent::Failed(_)])),
        "exit 3 is not listed: {r:?}"
    );
    let (_, r) = given(&picky_run).when(TaskCommand::Fail {
        node_id: node,
        exit_code: Some(75),
        reason: "tempfail".into(),
        attempt: None,
    });
    assert!(
        matches!(r.as_deref(), Ok([TaskEvent::Retrying(_)])),
        "{r:?}"
    );
    let (_, r) = given(&picky_run).when(TaskCommand::TimeOut {
        node_id: node,
        attempt: None,
    });
    assert!(
        matches!(
            r.as_deref(),
            Ok([TaskEvent::Retrying(TaskRetrying {
                exit_code: None,
                ..
            })])
        ),
        "{r:?}"
    );
    let (_, r) = given(&run[..]).when(TaskCommand::TimeOut {
        node_id: node,
        attempt: None,
    });
    assert!(
        matches!(r.as_deref(), Ok([TaskEvent::TimedOut(_)])),
        "time-outs do not retry by default: {r:?}"
    );
    // Without a retry policy a failure is final at once.
    let (_, r) = given(&[
        submit(),
        TaskCommand::Assign {
            node_id: node,
            gpus: vec![],
        },
    ])
    .when(fail());
    assert!(matches!(r.as_deref(), Ok([TaskEvent::Failed(_)])));
}
