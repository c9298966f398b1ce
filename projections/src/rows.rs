//! Read-model rows and how events change them. Pure: no I/O, no clock.

use chrono::{DateTime, TimeZone, Utc};
use ud_core::pipeline::{Pipeline, PipelineStatus};
use ud_core::schedule::Schedule;
use ud_schemas::api::PipelineStepView;
use ud_schemas::events::*;
use ud_schemas::spec::PipelineStep;
use ud_schemas::{
    Millis, NodeId, NodeStatus, PipelineEvent, PipelineId, ProjectId, ScheduleEvent, ScheduleId,
    SchedulingMode, TaskId, TaskStatus, TokenId,
};

pub fn ts(ms: Millis) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

#[derive(Clone, Debug, PartialEq)]
pub struct TaskRow {
    pub id: TaskId,
    pub project: String,
    pub name: Option<String>,
    pub state: TaskStatus,
    pub node_id: Option<NodeId>,
    pub attempt: i32,
    pub spec: serde_json::Value,
    /// What the run really used (task.prepared).
    pub prepared: Option<serde_json::Value>,
    /// The preparing step under way (task.preparing), until the run starts or ends.
    pub preparing: Option<serde_json::Value>,
    /// Why the task, pending, is not placed yet (task.waiting).
    pub waiting_reason: Option<String>,
    /// Current priority (higher first).
    pub priority: i32,
    /// The outputs the last run left in the object store (task.outputs).
    pub outputs: Option<serde_json::Value>,
    pub exit_code: Option<i32>,
    pub reason: Option<String>,
    pub submitted_by: String,
    pub submitted_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub version: i64,
    pub last_seq: i64,
    /// When its live run started (none while no run is live).
    pub started_at: Option<DateTime<Utc>>,
    /// GPU-milliseconds its ended runs used, by month (`{"2026-12": ms}`).
    pub gpu_ms: Option<serde_json::Value>,
}

/// Why an event could not be applied to a row.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("{0} event for an unknown aggregate")]
    UnknownAggregate(&'static str),
}

pub fn apply_task(
    row: Option<TaskRow>,
    id: TaskId,
    event: &TaskEvent,
    actor: &str,
    seq: u64,
) -> Result<TaskRow, ApplyError> {
    let seq = i64::try_from(seq).unwrap_or(i64::MAX);
    let mut row = match (row, event) {
        (None, TaskEvent::Submitted(e)) => {
            return Ok(TaskRow {
                id,
                project: e.project.to_string(),
                name: e.spec.name.clone(),
                state: TaskStatus::Pending,
                node_id: None,
                attempt: 0,
                spec: serde_json::to_value(&e.spec).unwrap_or_default(),
                prepared: None,
                preparing: None,
                waiting_reason: None,
                priority: e.spec.priority,
                outputs: None,
                exit_code: None,
                reason: None,
                submitted_by: actor.to_owned(),
                submitted_at: ts(e.at),
                updated_at: ts(e.at),
                finished_at: None,
                version: 1,
                last_seq: seq,
                started_at: None,
                gpu_ms: None,
            })
        }
        (None, e) => return Err(ApplyError::UnknownAggregate(e.name())),
        (Some(row), _) => row,
    };
    row.version += 1;
    row.last_seq = seq;
    row.updated_at = ts(event.at());
    if row.state.is_terminal() {
        return Ok(row);
    }
    if !matches!(
        event,
        TaskEvent::Preparing(_)
            | TaskEvent::Prepared(_)
            | TaskEvent::CancelRequested(_)
            | TaskEvent::Outputs(_)
    ) {
        row.preparing = None;
    }
    if !matches!(event, TaskEvent::Waiting(_) | TaskEvent::Reprioritized(_)) {
        row.waiting_reason = None;
    }
    match event {
        TaskEvent::Submitted(_) => {}
        TaskEvent::Waiting(e) => {
            row.waiting_reason = Some(e.reason.clone());
        }
        TaskEvent::Assigned(e) => {
            row.state = TaskStatus::Assigned;
            row.node_id = Some(e.node_id);
            row.attempt = i32::try_from(e.attempt).unwrap_or(i32::MAX);
            row.reason = None;
        }
        TaskEvent::Reprioritized(e) => {
            row.priority = e.priority;
        }
        TaskEvent::Retrying(e) => {
            row.state = TaskStatus::Pending;
            row.node_id = None;
            row.exit_code = e.exit_code;
            row.reason = Some(format!(
                "attempt {} failed: {}; retried from {}",
                e.attempt,
                e.reason,
                ts(e.not_before).to_rfc3339()
            ));
        }
        TaskEvent::Lost(e) => {
            row.state = TaskStatus::Pending;
            row.node_id = None;
            row.reason = Some(format!("attempt {} lost: {}", e.attempt, e.reason));
        }
        TaskEvent::Disconnected(e) => {
            row.state = TaskStatus::Disconnected;
            row.reason = Some(format!(
                "node {} went offline; lost at {} unless it is back",
                e.node_id,
                ts(e.lost_at).to_rfc3339()
            ));
        }
        TaskEvent::Reconnected(e) => {
            row.state = if e.running {
                TaskStatus::Running
            } else {
                TaskStatus::Assigned
            };
            row.reason = None;
        }
        TaskEvent::Preparing(e) => {
            row.preparing = Some(
                serde_json::json!({ "step": e.step, "since": ts(e.at), "attempt": e.attempt }),
            );
        }
        TaskEvent::Prepared(e) => {
            row.prepared = serde_json::to_value(e).ok();
        }
        TaskEvent::Outputs(e) => {
            row.outputs = serde_json::to_value(e).ok();
        }
        TaskEvent::Started(e) => {
            row.state = TaskStatus::Running;
            row.node_id = Some(e.node_id);
            row.end_run(e.at);
            row.started_at = Some(ts(e.at));
        }
        TaskEvent::Succeeded(e) => {
            row.state = TaskStatus::Succeeded;
            row.exit_code = Some(e.exit_code);
            row.finished_at = Some(ts(e.at));
        }
        TaskEvent::Failed(e) => {
            row.state = TaskStatus::Failed;
            row.exit_code = e.exit_code;
            row.reason = Some(e.reason.clone());
            row.finished_at = Some(ts(e.at));
        }
        TaskEvent::TimedOut(e) => {
            row.state = TaskStatus::TimedOut;
            row.reason = Some(ud_core::task::timed_out_reason(e.timeout_seconds));
            row.finished_at = Some(ts(e.at));
        }
        TaskEvent::CancelRequested(e) => {
            row.state = TaskStatus::Cancelling;
            row.reason = Some(e.reason.clone());
        }
        TaskEvent::Cancelled(e) => {
            row.state = TaskStatus::Cancelled;
            row.reason = Some(e.reason.clone());
            row.finished_at = Some(ts(e.at));
        }
    }
    if !matches!(
        row.state,
        TaskStatus::Running | TaskStatus::Disconnected | TaskStatus::Cancelling
    ) {
        row.end_run(event.at());
    }
    Ok(row)
}

#[derive(Clone, Debug, PartialEq)]
pub struct NodeRow {
    pub id: NodeId,
    pub name: String,
    pub labels: serde_json::Value,
    pub resources: serde_json::Value,
    pub status: NodeStatus,
    pub enrolled_at: Option<DateTime<Utc>>,
    pub registered_at: Option<DateTime<Utc>>,
    pub last_seen: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub offline_after: Option<DateTime<Utc>>,
    pub running_tasks: i32,
    pub last_seq: i64,
    pub disk_free_mb: Option<i64>,
    pub low_disk: bool,
    pub scheduling: SchedulingMode,
}

impl NodeRow {
    /// The one liveness rule ([`NodeStatus::of`]), so that the result does
    /// not depend on which stream (nodes, heartbeats) is projected first.
    fn settle_status(&mut self) {
        let ms = |t: Option<DateTime<Utc>>| t.map(|t| t.timestamp_millis());
        self.status = NodeStatus::of(
            self.revoked_at.is_some(),
            ms(self.last_seen),
            ms(self.offline_after),
        );
    }
}

pub fn apply_node(
    row: Option<NodeRow>,
    id: NodeId,
    event: &NodeEvent,
    seq: u64,
) -> Result<NodeRow, ApplyError> {
    let seq = i64::try_from(seq).unwrap_or(i64::MAX);
    let mut row = match (row, event) {
        (_, NodeEvent::Enrolled(e)) => NodeRow {
            id,
            name: e.name.clone(),
            labels: serde_json::to_value(&e.labels).unwrap_or_default(),
            resources: serde_json::json!({}),
            status: NodeStatus::Enrolled,
            enrolled_at: Some(ts(e.at)),
            registered_at: None,
            last_seen: None,
            revoked_at: None,
            offline_after: None,
            running_tasks: 0,
            last_seq: seq,
            disk_free_mb: None,
            low_disk: false,
            scheduling: SchedulingMode::Active,
        },
        // Nodes registered without enrollment (older histories) get a row too.
        (None, NodeEvent::Registered(e)) => NodeRow {
            id,
            name: e.name.clone(),
            labels: serde_json::to_value(&e.labels).unwrap_or_default(),
            resources: serde_json::to_value(&e.resources).unwrap_or_default(),
            status: NodeStatus::Enrolled,
            enrolled_at: None,
            registered_at: Some(ts(e.at)),
            last_seen: Some(ts(e.at)),
            revoked_at: None,
            offline_after: None,
            running_tasks: 0,
            last_seq: seq,
            disk_free_mb: None,
            low_disk: false,
            scheduling: SchedulingMode::Active,
        },
        (None, e) => return Err(ApplyError::UnknownAggregate(e.name())),
        (Some(mut row), NodeEvent::Registered(e)) => {
            row.name = e.name.clone();
            row.labels = serde_json::to_value(&e.labels).unwrap_or_default();
            row.resources = serde_json::to_value(&e.resources).unwrap_or_default();
            row.registered_at = Some(ts(e.at));
            row.last_seen = row.last_seen.max(Some(ts(e.at)));
            row.last_seq = seq;
            row
        }
        (Some(mut row), NodeEvent::Heartbeat(e)) => {
            if row.last_seen.is_none_or(|seen| ts(e.at) >= seen) {
                row.last_seen = Some(ts(e.at));
                row.running_tasks = i32::try_from(e.running_tasks).unwrap_or(i32::MAX);
                row.disk_free_mb = e.disk_free_mb.map(|d| i64::try_from(d).unwrap_or(i64::MAX));
                row.low_disk = e.low_disk;
            }
            row
        }
        (Some(mut row), NodeEvent::WentOffline(e)) => {
            row.offline_after = row.offline_after.max(Some(ts(e.last_seen)));
            row.last_seq = seq;
            row
        }
        (Some(mut row), NodeEvent::Revoked(e)) => {
            row.revoked_at = Some(ts(e.at));
            row.last_seq = seq;
            row
        }
        (Some(mut row), NodeEvent::Scheduling(e)) => {
            row.scheduling = e.mode;
            row.last_seq = seq;
            row
        }
    };
    row.settle_status();
    Ok(row)
}

#[derive(Clone, Debug, PartialEq)]
pub struct TokenRow {
    pub id: TokenId,
    pub name: String,
    pub digest: String,
    pub projects: Vec<String>,
    pub admin: bool,
    pub issued_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub user: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
}

pub fn apply_token(
    row: Option<TokenRow>,
    id: TokenId,
    event: &AuthEvent,
) -> Result<TokenRow, ApplyError> {
    match (row, event) {
        (_, AuthEvent::TokenIssued(e)) => Ok(TokenRow {
            id,
            name: e.name.clone(),
            digest: e.digest.clone(),
            projects: e.projects.iter().map(|p| p.to_string()).collect(),
            admin: e.admin,
            issued_at: ts(e.at),
            revoked_at: None,
            user: e.user.clone(),
            expires_at: e.expires_at.map(ts),
        }),
        (None, e) => Err(ApplyError::UnknownAggregate(e.name())),
        (Some(mut row), AuthEvent::TokenRevoked(e)) => {
            row.revoked_at = Some(ts(e.at));
            Ok(row)
        }
    }
}

/// PostgreSQL's `text` and `jsonb` cannot hold a NUL character: a value with
/// one would stop the projection at that event for good. Each NUL becomes
/// U+FFFD (what a node or an old event wrote is not refused here).
fn scrub(s: &mut String) {
    if s.contains('\0') {
        *s = s.replace('\0', "\u{fffd}");
    }
}

fn has_nul(s: &str) -> bool {
    s.contains('\0')
}

fn json_has_nul(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(s) => has_nul(s),
        serde_json::Value::Array(a) => a.iter().any(json_has_nul),
        serde_json::Value::Object(m) => m.iter().any(|(k, v)| has_nul(k) || json_has_nul(v)),
        _ => false,
    }
}

fn scrub_json(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) => scrub(s),
        serde_json::Value::Array(a) => a.iter_mut().for_each(scrub_json),
        serde_json::Value::Object(m) => {
            if m.keys().any(|k| k.contains('\0')) {
                let entries = std::mem::take(m);
                for (mut k, v) in entries {
                    scrub(&mut k);
                    m.insert(k, v);
                }
            }
            m.values_mut().for_each(scrub_json);
        }
        _ => {}
    }
}

impl TaskRow {
    /// Its live run, if any, ended at `at`: the GPU time it used goes to
    /// the months it spans.
    fn end_run(&mut self, at: Millis) {
        let Some(from) = self.started_at.take() else {
            return;
        };
        let gpus = self.spec["resources"]["gpus"].as_u64().unwrap_or(0);
        if gpus == 0 {
            return;
        }
        let mut months = match self.gpu_ms.take() {
            Some(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        for (month, ms) in ud_core::edge::scheduler::quota::split(from.timestamp_millis(), at) {
            let e = months
                .entry(ud_core::edge::scheduler::quota::month_name(month))
                .or_insert(0.into());
            *e = (e.as_u64().unwrap_or(0) + ms * gpus).into();
        }
        self.gpu_ms = (!months.is_empty()).then_some(serde_json::Value::Object(months));
    }

    /// The row fit for PostgreSQL, copied only when a value holds a NUL
    /// (the same values [`TaskRow::scrub`] mends).
    pub(crate) fn scrubbed(&self) -> std::borrow::Cow<'_, TaskRow> {
        let texts = [&self.project, &self.submitted_by].into_iter().chain(
            [&self.name, &self.waiting_reason, &self.reason]
                .into_iter()
                .flatten(),
        );
        let json = std::iter::once(&self.spec).chain(
            [&self.prepared, &self.preparing, &self.outputs]
                .into_iter()
                .flatten(),
        );
        if texts.into_iter().any(|s| has_nul(s)) || json.into_iter().any(json_has_nul) {
            let mut row = self.clone();
            row.scrub();
            std::borrow::Cow::Owned(row)
        } else {
            std::borrow::Cow::Borrowed(self)
        }
    }

    pub(crate) fn scrub(&mut self) {
        for s in [&mut self.project, &mut self.submitted_by] {
            scrub(s);
        }
        for s in [&mut self.name, &mut self.waiting_reason, &mut self.reason]
            .into_iter()
            .flatten()
        {
            scrub(s);
        }
        scrub_json(&mut self.spec);
        for v in [&mut self.prepared, &mut self.preparing, &mut self.outputs]
            .into_iter()
            .flatten()
        {
            scrub_json(v);
        }
    }
}

impl NodeRow {
    pub(crate) fn scrub(&mut self) {
        scrub(&mut self.name);
        scrub_json(&mut self.labels);
        scrub_json(&mut self.resources);
    }
}

impl TokenRow {
    pub(crate) fn scrub(&mut self) {
        scrub(&mut self.name);
        self.projects.iter_mut().for_each(scrub);
    }
}

/// One project event as the row change it makes. Each is applied on its
/// own, in order, and applying one again changes nothing.
#[derive(Clone, Debug, PartialEq)]
pub enum ProjectChange {
    Created {
        name: String,
        description: String,
        at: DateTime<Utc>,
        by: String,
    },
    Member {
        project: String,
        user: String,
        role: &'static str,
        at: DateTime<Utc>,
    },
    Removed {
        project: String,
        user: String,
    },
    Archived {
        name: String,
        at: DateTime<Utc>,
    },
}

pub fn project_change(
    project: &ud_schemas::ProjectId,
    event: &ud_schemas::ProjectEvent,
    actor: &str,
) -> ProjectChange {
    use ud_schemas::ProjectEvent as E;
    let name = project.to_string();
    let mut change = match event {
        E::Created(e) => ProjectChange::Created {
            name,
            description: e.description.clone(),
            at: ts(e.at),
            by: actor.to_owned(),
        },
        E::MemberAdded(ud_schemas::events::ProjectMemberAdded { at, user, role })
        | E::RoleChanged(ud_schemas::events::ProjectRoleChanged { at, user, role }) => {
            ProjectChange::Member {
                project: name,
                user: user.clone(),
                role: role.as_str(),
                at: ts(*at),
            }
        }
        E::MemberRemoved(e) => ProjectChange::Removed {
            project: name,
            user: e.user.clone(),
        },
        E::Archived(e) => ProjectChange::Archived { name, at: ts(e.at) },
    };
    match &mut change {
        ProjectChange::Created {
            description, by, ..
        } => {
            scrub(description);
            scrub(by);
        }
        ProjectChange::Member { user, .. } | ProjectChange::Removed { user, .. } => scrub(user),
        ProjectChange::Archived { .. } => {}
    }
    change
}

#[cfg(test)]
mod scrub_tests {
    use super::*;

    #[test]
    fn nul_characters_become_replacement_characters_everywhere() {
        let mut v = serde_json::json!({"a\0": ["x\0", {"b": "\0"}], "n": 1});
        scrub_json(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"a\u{fffd}": ["x\u{fffd}", {"b": "\u{fffd}"}], "n": 1})
        );
    }
}

/// The read model's rows and the domain's own `evolve` say the same of any
/// history the domain can produce.
#[cfg(test)]
mod agreement {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use ud_core::task::{self, Task, TaskCommand, TaskState};
    use ud_schemas::spec::{Resources, RetryPolicy};
    use ud_schemas::{ProjectId, TaskSpec};

    use super::*;

    fn spec(max_attempts: u32) -> TaskSpec {
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
                gpus: 2,
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
                max_attempts,
                backoff_seconds: 0,
                exit_codes: vec![],
                on_timeout: true,
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

    /// A command of kind `k` as a node or user would give it to `t` now.
    fn command(k: u8, code: i32, nodes: &[NodeId], t: &Task) -> TaskCommand {
        let (live, attempt) = match &t.state {
            TaskState::Assigned { node_id, attempt }
            | TaskState::Running { node_id, attempt }
            | TaskState::Disconnected {
                node_id, attempt, ..
            }
            | TaskState::Cancelling {
                node_id, attempt, ..
            } => (*node_id, *attempt),
            _ => (nodes[usize::from(k) % nodes.len()], t.attempts),
        };
        match k % 13 {
            11 => TaskCommand::Disconnect {
                node_id: live,
                lost_at: 600_000,
            },
            12 => TaskCommand::Reconnect { node_id: live },
            0 => TaskCommand::Assign {
                node_id: live,
                gpus: vec![],
            },
            1 => TaskCommand::Start {
                node_id: live,
                attempt,
            },
            2 => TaskCommand::Succeed {
                node_id: live,
                exit_code: code,
                attempt: None,
            },
            3 => TaskCommand::Fail {
                node_id: live,
                exit_code: Some(code + 1),
                reason: "exited".into(),
                attempt: None,
            },
            4 => TaskCommand::TimeOut {
                node_id: live,
                attempt: None,
            },
            5 => TaskCommand::Lose {
                node_id: live,
                reason: "gone".into(),
            },
            6 => TaskCommand::Cancel {
                reason: "stop".into(),
            },
            7 => TaskCommand::ConfirmCancelled {
                node_id: live,
                reason: "stopped".into(),
                attempt: None,
            },
            8 => TaskCommand::Wait {
                reason: "busy".into(),
                kind: "room".into(),
            },
            9 => TaskCommand::Reprioritize {
                priority: code * 10,
            },
            _ => TaskCommand::RecordPreparing {
                node_id: live,
                attempt,
                step: "build_image".into(),
            },
        }
    }

    proptest! {
        #[test]
        fn rows_and_the_domain_agree_on_every_history(
            kinds in proptest::collection::vec(0u8..52, 1..60),
            codes in proptest::collection::vec(0i32..3, 60),
            max_attempts in 1u32..4,
        ) {
            let id = TaskId::new();
            let nodes = [NodeId::new(), NodeId::new()];
            let submit = TaskCommand::Submit {
                project: ProjectId::parse("lab").map_err(|e| TestCaseError::fail(e.to_string()))?,
                spec: spec(max_attempts),
                idempotency_key: None,
            };
            let mut task: Option<Task> = None;
            let mut row: Option<TaskRow> = None;
            // The scheduler's GPU time, folded as its view folds it.
            let mut gpu_time = ud_core::edge::scheduler::quota::GpuTime::default();
            let mut seq = 0;
            let steps = std::iter::once(None).chain(kinds.iter().copied().map(Some));
            for (i, k) in steps.enumerate() {
                let cmd = match (k, &task) {
                    (None, _) => submit.clone(),
                    (Some(k), Some(t)) => command(k, codes[i % codes.len()], &nodes, t),
                    (Some(_), None) => break,
                };
                let Ok(events) = task::decide(task.as_ref(), cmd, i64::try_from(i).unwrap_or(0)) else {
                    continue;
                };
                for e in &events {
                    seq += 1;
                    task = task::evolve(task, id, e);
                    if let (TaskEvent::Started(s), Some(t)) = (e, &task) {
                        gpu_time.start(id, &t.project, t.spec.resources.gpus, s.at);
                    } else if task.as_ref().is_none_or(|t| t.state.live_node().is_none()) {
                        gpu_time.stop(id, e.at());
                    }
                    row = Some(apply_task(row, id, e, "user", seq).map_err(|e| TestCaseError::fail(e.to_string()))?);
                }
                let (Some(t), Some(r)) = (&task, &row) else { continue };
                prop_assert_eq!(r.state, t.state.status());
                prop_assert_eq!(r.priority, t.spec.priority);
                match &t.state {
                    TaskState::Assigned { node_id, attempt }
                    | TaskState::Running { node_id, attempt }
                    | TaskState::Disconnected { node_id, attempt, .. }
                    | TaskState::Cancelling { node_id, attempt, .. } => {
                        prop_assert_eq!(r.node_id, Some(*node_id));
                        prop_assert_eq!(i64::from(r.attempt), i64::from(*attempt));
                    }
                    TaskState::Pending => prop_assert_eq!(r.node_id, None),
                    TaskState::Succeeded { exit_code } => prop_assert_eq!(r.exit_code, Some(*exit_code)),
                    TaskState::Failed { exit_code, .. } => prop_assert_eq!(r.exit_code, *exit_code),
                    TaskState::TimedOut | TaskState::Cancelled { .. } => {}
                }
            }
            // The read model and the scheduler count the same GPU time.
            if let Some(r) = &row {
                let now = 1_000_000;
                let closed: u64 = r.gpu_ms.as_ref().and_then(|m| m.as_object()).map_or(0, |m| m.values().filter_map(|v| v.as_u64()).sum());
                let open = r.started_at.map_or(0, |s| u64::try_from(now - s.timestamp_millis()).unwrap_or(0) * 2);
                prop_assert_eq!(closed + open, gpu_time.used("lab", now));
            }
        }
    }
}

/// A pipeline as the read model holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct PipelineRow {
    pub id: PipelineId,
    pub project: String,
    pub name: Option<String>,
    /// running, succeeded, failed or cancelled.
    pub status: String,
    pub cancelling: bool,
    /// The steps as submitted (`[PipelineStep]`).
    pub definition: serde_json::Value,
    /// Each step as it runs (`[PipelineStepView]`).
    pub steps: serde_json::Value,
    pub submitted_by: String,
    pub submitted_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub version: i64,
    pub last_seq: i64,
}

/// A pipeline while a batch of its events is applied: the aggregate itself
/// (its rules decide what each event does to its steps) and the row's own
/// bookkeeping.
#[derive(Clone, Debug)]
pub struct PipelineFold {
    pub state: Pipeline,
    pub submitted_by: String,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub version: i64,
    pub last_seq: i64,
}

impl PipelineFold {
    pub fn from_row(row: &PipelineRow) -> Option<Self> {
        let steps: Vec<PipelineStep> = serde_json::from_value(row.definition.clone()).ok()?;
        let views: Vec<PipelineStepView> = serde_json::from_value(row.steps.clone()).ok()?;
        let submitted = PipelineSubmitted {
            at: row.submitted_at.timestamp_millis(),
            project: ProjectId::parse(&row.project).ok()?,
            name: row.name.clone(),
            steps,
            idempotency_key: None,
        };
        let status = PipelineStatus::parse(&row.status)?;
        Some(Self {
            state: Pipeline::restore(row.id, &submitted, status, row.cancelling, &views)?,
            submitted_by: row.submitted_by.clone(),
            updated_at: row.updated_at,
            finished_at: row.finished_at,
            version: row.version,
            last_seq: row.last_seq,
        })
    }

    pub fn into_row(self) -> PipelineRow {
        let p = &self.state;
        PipelineRow {
            id: p.id,
            project: p.project.to_string(),
            name: p.name.clone(),
            status: p.status.as_str().to_owned(),
            cancelling: p.cancelling,
            definition: serde_json::to_value(p.listed.as_ref()).unwrap_or_default(),
            steps: serde_json::to_value(p.views()).unwrap_or_default(),
            submitted_by: self.submitted_by,
            submitted_at: ts(p.submitted_at),
            updated_at: self.updated_at,
            finished_at: self.finished_at,
            version: self.version,
            last_seq: self.last_seq,
        }
    }
}

pub fn apply_pipeline(
    fold: Option<PipelineFold>,
    id: PipelineId,
    event: &PipelineEvent,
    actor: &str,
    seq: u64,
) -> Result<PipelineFold, ApplyError> {
    let seq = i64::try_from(seq).unwrap_or(i64::MAX);
    let at = ts(event.at());
    let unknown = || ApplyError::UnknownAggregate(event.name());
    let mut f = match fold {
        Some(mut f) => {
            // The aggregate moves through its rules, without a copy.
            f.state = ud_core::pipeline::evolve(Some(f.state), id, event).ok_or_else(unknown)?;
            f
        }
        // Only a submission makes a pipeline.
        None => PipelineFold {
            state: ud_core::pipeline::evolve(None, id, event).ok_or_else(unknown)?,
            submitted_by: actor.to_owned(),
            updated_at: at,
            finished_at: None,
            version: 0,
            last_seq: seq,
        },
    };
    f.updated_at = at;
    f.version += 1;
    f.last_seq = seq;
    match event {
        PipelineEvent::Ended(_) => f.finished_at = Some(at),
        PipelineEvent::Rerun(_) => f.finished_at = None,
        _ => {}
    }
    Ok(f)
}

/// A schedule as the read model holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleRow {
    pub id: ScheduleId,
    pub project: String,
    pub name: String,
    pub cron: String,
    pub timezone: String,
    /// skip or catch_up.
    pub missed: String,
    /// `{"task": ...}` or `{"pipeline": ...}`: the REST body it submits.
    pub body: serde_json::Value,
    /// active, paused or deleted.
    pub state: String,
    pub paused_reason: Option<String>,
    pub done_until: DateTime<Utc>,
    pub fired: i64,
    pub skipped: i64,
    pub last_due: Option<DateTime<Utc>>,
    pub last_task_id: Option<uuid::Uuid>,
    pub last_pipeline_id: Option<uuid::Uuid>,
    pub last_error: Option<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub version: i64,
    pub last_seq: i64,
}

/// A schedule while a batch of its events is applied: the aggregate and
/// the row's own bookkeeping.
#[derive(Clone, Debug)]
pub struct ScheduleFold {
    pub state: Schedule,
    pub created_by: String,
    pub updated_at: DateTime<Utc>,
    pub version: i64,
    pub last_seq: i64,
}

impl ScheduleFold {
    pub fn from_row(row: &ScheduleRow) -> Option<Self> {
        let missed: Missed =
            serde_json::from_value(serde_json::Value::String(row.missed.clone())).ok()?;
        let created = ScheduleCreated {
            at: row.created_at.timestamp_millis(),
            project: ProjectId::parse(&row.project).ok()?,
            name: row.name.clone(),
            cron: row.cron.clone(),
            timezone: row.timezone.clone(),
            missed,
            task: row.body.get("task").cloned(),
            pipeline: row.body.get("pipeline").cloned(),
        };
        let last_fired = row.last_due.map(|due| ScheduleFired {
            at: 0,
            due: due.timestamp_millis(),
            task_id: row.last_task_id.map(TaskId),
            pipeline_id: row.last_pipeline_id.map(PipelineId),
            error: row.last_error.clone(),
        });
        Some(Self {
            state: Schedule {
                id: row.id,
                created,
                paused: row.paused_reason.clone(),
                deleted: row.state == "deleted",
                done_until: row.done_until.timestamp_millis(),
                fired: row.fired.unsigned_abs(),
                skipped: row.skipped.unsigned_abs(),
                last_fired,
            },
            created_by: row.created_by.clone(),
            updated_at: row.updated_at,
            version: row.version,
            last_seq: row.last_seq,
        })
    }

    pub fn into_row(self) -> ScheduleRow {
        let s = self.state;
        let state = if s.deleted {
            "deleted"
        } else if s.paused.is_some() {
            "paused"
        } else {
            "active"
        };
        let mut body = serde_json::Map::new();
        if let Some(t) = s.created.task {
            body.insert("task".into(), t);
        }
        if let Some(p) = s.created.pipeline {
            body.insert("pipeline".into(), p);
        }
        let last = s.last_fired;
        ScheduleRow {
            id: s.id,
            project: s.created.project.to_string(),
            name: s.created.name,
            cron: s.created.cron,
            timezone: s.created.timezone,
            missed: s.created.missed.as_str().to_owned(),
            body: serde_json::Value::Object(body),
            state: state.to_owned(),
            paused_reason: s.paused,
            done_until: ts(s.done_until),
            fired: i64::try_from(s.fired).unwrap_or(i64::MAX),
            skipped: i64::try_from(s.skipped).unwrap_or(i64::MAX),
            last_due: last.as_ref().map(|f| ts(f.due)),
            last_task_id: last.as_ref().and_then(|f| f.task_id).map(|t| t.0),
            last_pipeline_id: last.as_ref().and_then(|f| f.pipeline_id).map(|p| p.0),
            last_error: last.and_then(|f| f.error),
            created_by: self.created_by,
            created_at: ts(s.created.at),
            updated_at: self.updated_at,
            version: self.version,
            last_seq: self.last_seq,
        }
    }
}

pub fn apply_schedule(
    fold: Option<ScheduleFold>,
    id: ScheduleId,
    event: &ScheduleEvent,
    actor: &str,
    seq: u64,
) -> Result<ScheduleFold, ApplyError> {
    use ud_core::aggregate::Aggregate;
    let seq = i64::try_from(seq).unwrap_or(i64::MAX);
    let at = ts(event.at());
    let unknown = || ApplyError::UnknownAggregate(event.name());
    let mut f = match fold {
        Some(mut f) => {
            f.state = Schedule::evolve(Some(f.state), id, event).ok_or_else(unknown)?;
            f
        }
        None => ScheduleFold {
            state: Schedule::evolve(None, id, event).ok_or_else(unknown)?,
            created_by: actor.to_owned(),
            updated_at: at,
            version: 0,
            last_seq: seq,
        },
    };
    f.updated_at = at;
    f.version += 1;
    f.last_seq = seq;
    Ok(f)
}
