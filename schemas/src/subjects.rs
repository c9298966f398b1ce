//! The subject hierarchy under `ud.`.
//!
//! | subject | what |
//! | --- | --- |
//! | `ud.task.<task_id>.<event>` | task lifecycle events |
//! | `ud.node.<node_id>.<event>` | node registration, liveness (heartbeats live in their own stream) |
//! | `ud.auth.token.<token_id>.<event>` | API token issued / revoked |
//! | `ud.auth.secret.<project>.<NAME>.<event>` | project secret set / deleted (name and version only) |
//! | `ud.auth.project.<project>.<event>` | project created, member added / role changed / removed, archived |
//! | `ud.pipeline.<pipeline_id>.<event>` | pipeline events: steps started, ended, skipped; cancel, rerun, end |
//! | `ud.log.<task_id>` | a task's output, chunk by chunk |
//! | `ud.cmd.<endpoint>` | command services (NATS micro, JSON request/reply) |
//! | `ud.sys.projected.<stream>` | core-NATS notice: a projector committed up to a sequence |

use crate::ids::{NodeId, PipelineId, ScheduleId, TaskId, TokenId};

pub const TASK_PREFIX: &str = "ud.task";
pub const NODE_PREFIX: &str = "ud.node";
pub const PIPELINE_PREFIX: &str = "ud.pipeline";
pub const SCHEDULE_PREFIX: &str = "ud.schedule";
pub const TOKEN_PREFIX: &str = "ud.auth.token";
pub const SECRET_PREFIX: &str = "ud.auth.secret";
pub const PROJECT_PREFIX: &str = "ud.auth.project";
pub const PROJECTED_PREFIX: &str = "ud.sys.projected";
pub const LOG_PREFIX: &str = "ud.log";

pub fn task_event(id: &TaskId, name: &str) -> String {
    format!("{TASK_PREFIX}.{id}.{name}")
}

/// The last subject tokens of the events a task ends with.
pub const TASK_ENDS: [&str; 4] = ["succeeded", "failed", "timed_out", "cancelled"];

/// Filters of every task's ending events (`ud.task.*.succeeded`, ...).
pub fn task_end_filters() -> Vec<String> {
    TASK_ENDS
        .iter()
        .map(|e| format!("{TASK_PREFIX}.*.{e}"))
        .collect()
}

/// Every event of one task: the concurrency scope of the task aggregate.
pub fn task_all(id: &TaskId) -> String {
    format!("{TASK_PREFIX}.{id}.>")
}

pub fn node_event(id: &NodeId, name: &str) -> String {
    format!("{NODE_PREFIX}.{id}.{name}")
}

pub fn node_all(id: &NodeId) -> String {
    format!("{NODE_PREFIX}.{id}.>")
}

pub fn pipeline_event(id: &PipelineId, name: &str) -> String {
    format!("{PIPELINE_PREFIX}.{id}.{name}")
}

/// Every event of one pipeline: the concurrency scope of the pipeline aggregate.
pub fn pipeline_all(id: &PipelineId) -> String {
    format!("{PIPELINE_PREFIX}.{id}.>")
}

pub fn schedule_event(id: &ScheduleId, name: &str) -> String {
    format!("{SCHEDULE_PREFIX}.{id}.{name}")
}

/// Every event of one schedule: the concurrency scope of the schedule aggregate.
pub fn schedule_all(id: &ScheduleId) -> String {
    format!("{SCHEDULE_PREFIX}.{id}.>")
}

pub fn token_event(id: &TokenId, name: &str) -> String {
    format!("{TOKEN_PREFIX}.{id}.{name}")
}

pub fn token_all(id: &TokenId) -> String {
    format!("{TOKEN_PREFIX}.{id}.>")
}

pub fn secret_event(s: &crate::events::SecretRef, name: &str) -> String {
    format!("{SECRET_PREFIX}.{}.{}.{name}", s.project, s.name)
}

pub fn secret_all(s: &crate::events::SecretRef) -> String {
    format!("{SECRET_PREFIX}.{}.{}.>", s.project, s.name)
}

pub fn project_event(p: &crate::ProjectId, name: &str) -> String {
    format!("{PROJECT_PREFIX}.{p}.{name}")
}

/// Every event of one project: the concurrency scope of the project aggregate.
pub fn project_all(p: &crate::ProjectId) -> String {
    format!("{PROJECT_PREFIX}.{p}.>")
}

/// A task's output chunks (stream `UD_LOGS`).
pub fn log(task: &TaskId) -> String {
    format!("{LOG_PREFIX}.{task}")
}

pub fn projected(stream: &str) -> String {
    format!("{PROJECTED_PREFIX}.{stream}")
}

/// Which aggregate a subject belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParsedSubject<'a> {
    Task {
        id: TaskId,
        name: &'a str,
    },
    Node {
        id: NodeId,
        name: &'a str,
    },
    Token {
        id: TokenId,
        name: &'a str,
    },
    Secret {
        secret: crate::events::SecretRef,
        name: &'a str,
    },
    Pipeline {
        id: PipelineId,
        name: &'a str,
    },
    Schedule {
        id: ScheduleId,
        name: &'a str,
    },
    Project {
        project: crate::ProjectId,
        name: &'a str,
    },
}

/// Parses an event subject; `None` for anything that is not one.
pub fn parse(subject: &str) -> Option<ParsedSubject<'_>> {
    let mut parts = subject.split('.');
    if parts.next()? != "ud" {
        return None;
    }
    let parsed = match parts.next()? {
        "task" => {
            let id = parts.next()?.parse().ok()?;
            ParsedSubject::Task {
                id,
                name: parts.next()?,
            }
        }
        "node" => {
            let id = parts.next()?.parse().ok()?;
            ParsedSubject::Node {
                id,
                name: parts.next()?,
            }
        }
        "pipeline" => {
            let id = parts.next()?.parse().ok()?;
            ParsedSubject::Pipeline {
                id,
                name: parts.next()?,
            }
        }
        "schedule" => {
            let id = parts.next()?.parse().ok()?;
            ParsedSubject::Schedule {
                id,
                name: parts.next()?,
            }
        }
        "auth" => match parts.next()? {
            "token" => {
                let id = parts.next()?.parse().ok()?;
                ParsedSubject::Token {
                    id,
                    name: parts.next()?,
                }
            }
            "secret" => {
                let project = parts.next()?.parse().ok()?;
                let secret = crate::spec::secret_name(parts.next()?).ok()?.to_owned();
                ParsedSubject::Secret {
                    secret: crate::events::SecretRef {
                        project,
                        name: secret,
                    },
                    name: parts.next()?,
                }
            }
            "project" => {
                let project = parts.next()?.parse().ok()?;
                ParsedSubject::Project {
                    project,
                    name: parts.next()?,
                }
            }
            _ => return None,
        },
        _ => return None,
    };
    if parts.next().is_some() {
        return None;
    }
    Some(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let id = TaskId::new();
        let s = task_event(&id, "failed");
        assert_eq!(parse(&s), Some(ParsedSubject::Task { id, name: "failed" }));
        assert_eq!(parse("ud.task.nope.failed"), None);
        assert_eq!(parse(&format!("{s}.extra")), None);
        assert_eq!(parse("other.task"), None);
        let secret = crate::events::SecretRef {
            project: "lab".parse().unwrap_or_else(|e| unreachable!("{e}")),
            name: "WANDB_API_KEY".into(),
        };
        assert_eq!(
            parse(&secret_event(&secret, "set")),
            Some(ParsedSubject::Secret {
                secret,
                name: "set"
            })
        );
        assert_eq!(parse("ud.auth.secret.lab.not-a-name.set"), None);
        let p = PipelineId::new();
        assert_eq!(
            parse(&pipeline_event(&p, "step_ended")),
            Some(ParsedSubject::Pipeline {
                id: p,
                name: "step_ended"
            })
        );
    }
}
