//! First-fit placement and the controller loop that runs liveness and
//! scheduling on the main server.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{info, warn};
use ud_schemas::dispatch::{self, DispatchCancel, DispatchRun};
use ud_schemas::{edge, now_millis, streams, NodeId, Resources, TaskId, TaskSpec};

use super::view::{self, Cluster, Update};
use crate::commands::{CommandError, TaskCommands};
use crate::node::Node;
use crate::store::{publish_each, Expect};
use crate::task::{self, TaskCommand, TaskState};
use async_nats::jetstream::message::PublishMessage;
use ud_schemas::codec::EventMeta;
use ud_schemas::Event;

/// An assigned task whose node has not started it gets its run again after this.
const RESEND_AFTER: Duration = Duration::from_secs(30);

/// Assignments of one scheduling pass in flight at once.
const PLACEMENTS_IN_FLIGHT: usize = 256;
/// Run dispatches awaiting the stream's acknowledgement at once.
const DISPATCHES_IN_FLIGHT: usize = 256;

/// What the tasks placed on a node take from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub cpu_millis: u64,
    pub memory_mb: u64,
    pub gpus: u64,
    /// Disk the node's live tasks asked for; counted against the free disk
    /// it last reported (conservative: their real use is in that figure too).
    pub disk_mb: u64,
}

/// Does `req` fit on `node` next to `used`?
pub fn fits(node: &Node, used: Usage, req: &Resources) -> bool {
    let Some(res) = &node.resources else {
        return false;
    };
    if node.low_disk || node.scheduling != "active" {
        return false;
    }
    let labels_ok = req
        .labels
        .iter()
        .all(|(k, v)| node.labels.get(k) == Some(v));
    let gpu_model_ok = match &req.gpu_model {
        Some(model) => {
            req.gpus == 0
                || res.gpus.iter().filter(|g| &g.model == model).count() as u64
                    >= used.gpus + u64::from(req.gpus)
        }
        None => true,
    };
    // Free disk as the last heartbeat said, less what the node's live tasks asked for.
    let disk_ok = req.disk_mb == 0
        || node
            .disk_free_mb
            .is_some_and(|free| used.disk_mb + req.disk_mb <= free);
    labels_ok
        && gpu_model_ok
        && disk_ok
        && used.cpu_millis + u64::from(req.cpu_millis) <= u64::from(res.cpu_millis)
        && used.memory_mb + req.memory_mb <= res.memory_mb
        && used.gpus + u64::from(req.gpus) <= res.gpus.len() as u64
}

/// How a task chooses among the nodes it fits on (`UD_PLACEMENT`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Placement {
    /// The fullest node that fits: keeps whole nodes free for large tasks.
    #[default]
    Pack,
    /// The emptiest node: spreads load.
    Spread,
}

impl std::str::FromStr for Placement {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pack" => Ok(Self::Pack),
            "spread" => Ok(Self::Spread),
            other => Err(format!("placement {other:?} is not pack or spread")),
        }
    }
}

/// The node `req` goes to: among the nodes it fits on, the one carrying
/// the most of its preferred labels, then the fullest (pack) or emptiest
/// (spread) by CPU after placing it, then the lowest id (stable choices).
pub fn place<'a>(
    nodes: impl Iterator<Item = &'a Node>,
    usage: &HashMap<NodeId, Usage>,
    req: &Resources,
    strategy: Placement,
) -> Option<NodeId> {
    let used = |n: &Node| usage.get(&n.id).copied().unwrap_or_default();
    nodes
        .filter(|n| fits(n, used(n), req))
        .max_by_key(|n| {
            let preferred = req
                .preferred_labels
                .iter()
                .filter(|(k, v)| n.labels.get(*k) == Some(*v))
                .count();
            let total = n
                .resources
                .as_ref()
                .map_or(1, |r| u64::from(r.cpu_millis).max(1));
            let after = used(n).cpu_millis + u64::from(req.cpu_millis);
            // Free share after placing, in thousandths.
            let free = total.saturating_sub(after) * 1000 / total;
            let fill = match strategy {
                Placement::Pack => 1000 - free.min(1000),
                Placement::Spread => free,
            };
            (preferred, fill, std::cmp::Reverse(n.id))
        })
        .map(|n| n.id)
}

/// One queue's settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Tasks of higher-priority queues are considered first.
    #[serde(default)]
    pub priority: i32,
    /// Most tasks of the queue assigned or running at once.
    #[serde(default)]
    pub max_running: Option<u32>,
}

/// Queue settings by name (`UD_QUEUES_FILE`, JSON
/// `{"queues": {"gpu": {"priority": 10, "max_running": 4}}}`); a queue not
/// named has priority 0 and no limit.
#[derive(Clone, Debug, Default)]
pub struct Queues {
    file: std::collections::BTreeMap<String, QueueConfig>,
    /// Set through the API (the `ud_queues` bucket): these win over the file.
    set: std::collections::BTreeMap<String, QueueConfig>,
}

/// A queue's settings as the API stores them in the `ud_queues` bucket.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct QueueRecord {
    pub priority: i32,
    pub max_running: Option<u32>,
    pub updated_by: String,
    /// Milliseconds since the epoch.
    pub updated_at: i64,
}

impl Queues {
    pub fn parse(text: &str) -> Result<Self, super::EdgeError> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            queues: std::collections::BTreeMap<String, QueueConfig>,
        }
        let f: File = serde_json::from_str(text)
            .map_err(|e| super::EdgeError::Invalid(format!("queues file: {e}")))?;
        Ok(Self {
            file: f.queues,
            set: Default::default(),
        })
    }

    pub fn load(path: &std::path::Path) -> Result<Self, super::EdgeError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            super::EdgeError::Invalid(format!("cannot read {}: {e}", path.display()))
        })?;
        Self::parse(&text)
    }

    pub fn get(&self, name: &str) -> QueueConfig {
        self.set
            .get(name)
            .or_else(|| self.file.get(name))
            .cloned()
            .unwrap_or_default()
    }

    /// A queue's settings from the API (`None`: back to the file's or the defaults).
    pub fn set(&mut self, name: &str, config: Option<QueueConfig>) {
        match config {
            Some(c) => self.set.insert(name.to_owned(), c),
            None => self.set.remove(name),
        };
    }
}

/// One pending task as the queue sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queued<'a> {
    pub id: TaskId,
    /// Its queue's priority (queues of higher priority first).
    pub queue_priority: i32,
    pub priority: i32,
    pub project: &'a str,
    /// Stream sequence of its submission (or of its return to pending).
    pub seq: u64,
    /// Tasks of its project assigned or running now.
    pub live: usize,
    /// When its project was last given a node (a rising counter; 0: never).
    pub served: u64,
}

/// The order pending tasks are considered in: higher queue priority first,
/// then higher task priority; within
/// a priority, projects take turns — a project's k-th waiting task goes
/// after every other project's (k-1)-th, counting what each project runs
/// now, and of equal turns the project served least recently goes first —
/// so one project's 10,000 submissions do not starve another project's one.
/// Each project's tasks keep their submission order.
pub fn fair_order(tasks: &[Queued<'_>]) -> Vec<TaskId> {
    use std::cmp::Reverse;
    use std::collections::BTreeMap;
    /// Queue priority then task priority, higher first.
    type Level = (Reverse<i32>, Reverse<i32>);
    let mut by_level: BTreeMap<(Level, &str), Vec<&Queued<'_>>> = BTreeMap::new();
    for t in tasks {
        by_level
            .entry(((Reverse(t.queue_priority), Reverse(t.priority)), t.project))
            .or_default()
            .push(t);
    }
    // (level, turn, when the project was served, its first sequence, sequence)
    let mut keyed: Vec<(Level, usize, u64, u64, u64, TaskId)> = Vec::with_capacity(tasks.len());
    for ((level, _), mut list) in by_level {
        list.sort_by_key(|t| t.seq);
        let first = list.first().map_or(0, |t| t.seq);
        keyed.extend(
            list.iter()
                .enumerate()
                .map(|(turn, t)| (level, t.live + turn, t.served, first, t.seq, t.id)),
        );
    }
    keyed.sort();
    keyed.into_iter().map(|k| k.5).collect()
}

/// Why a request is not placed now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unplaced {
    /// Some enrolled node could run it once it is online, in service and has
    /// room. `kind` names what keeps it waiting, without counts.
    Waits { reason: String, kind: String },
    /// No enrolled node could ever run it, even empty.
    Never(String),
}

fn describe(req: &Resources) -> String {
    let mut s = format!(
        "{} CPUs, {} MB",
        f64::from(req.cpu_millis) / 1000.0,
        req.memory_mb
    );
    if req.gpus > 0 {
        s.push_str(&format!(", {} GPUs", req.gpus));
        if let Some(m) = &req.gpu_model {
            s.push_str(&format!(" ({m})"));
        }
    }
    for (k, v) in &req.labels {
        s.push_str(&format!(", label {k}={v}"));
    }
    s
}

/// What of `req` this node could never give, even empty (`None`: it could,
/// or its resources are not known yet).
fn never_fits(node: &Node, req: &Resources) -> Option<&'static str> {
    let res = node.resources.as_ref()?;
    if !req
        .labels
        .iter()
        .all(|(k, v)| node.labels.get(k) == Some(v))
    {
        return Some("labels");
    }
    let gpus = match &req.gpu_model {
        Some(model) => res.gpus.iter().filter(|g| &g.model == model).count(),
        None => res.gpus.len(),
    };
    if (gpus as u64) < u64::from(req.gpus) {
        return Some("GPUs");
    }
    if req.cpu_millis > res.cpu_millis {
        return Some("CPUs");
    }
    if req.memory_mb > res.memory_mb {
        return Some("memory");
    }
    if res.disk_mb > 0 && req.disk_mb > res.disk_mb {
        return Some("disk");
    }
    None
}

fn counts(items: &std::collections::BTreeMap<&str, usize>) -> String {
    items
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why `req` is not placed on any of `nodes` (every enrolled node) now.
pub fn explain<'a>(
    nodes: impl Iterator<Item = &'a Node>,
    usage: &HashMap<NodeId, Usage>,
    req: &Resources,
) -> Unplaced {
    use crate::node::Liveness;
    use std::collections::BTreeMap;
    let nodes: Vec<&Node> = nodes.filter(|n| !n.revoked).collect();
    if nodes.is_empty() {
        return Unplaced::Waits {
            reason: format!("no compute node is enrolled (needs {})", describe(req)),
            kind: "no nodes".into(),
        };
    }
    let (mut could, mut never, mut why) = (0usize, BTreeMap::new(), BTreeMap::new());
    for n in &nodes {
        if let Some(what) = never_fits(n, req) {
            *never.entry(what).or_insert(0) += 1;
            continue;
        }
        could += 1;
        let state = if n.resources.is_none() {
            "not registered yet"
        } else if n.liveness() != Liveness::Online {
            "offline"
        } else if n.scheduling != "active" {
            if n.scheduling == "draining" {
                "draining"
            } else {
                "cordoned"
            }
        } else if n.low_disk {
            "low on disk"
        } else if fits(n, usage.get(&n.id).copied().unwrap_or_default(), req) {
            "free"
        } else {
            "busy"
        };
        *why.entry(state).or_insert(0) += 1;
    }
    if could == 0 {
        return Unplaced::Never(format!(
            "no enrolled node could ever run it (needs {}; too few or none of: {})",
            describe(req),
            counts(&never)
        ));
    }
    Unplaced::Waits {
        reason: format!(
            "waiting for room: {could} of {} nodes could run it ({})",
            nodes.len(),
            counts(&why)
        ),
        kind: why.keys().copied().collect::<Vec<_>>().join(","),
    }
}

fn add(usage: &mut HashMap<NodeId, Usage>, node: NodeId, spec: &TaskSpec) {
    let u = usage.entry(node).or_default();
    u.cpu_millis += u64::from(spec.resources.cpu_millis);
    u.memory_mb += spec.resources.memory_mb;
    u.gpus += u64::from(spec.resources.gpus);
    u.disk_mb += spec.resources.disk_mb;
}

#[derive(Clone, Debug)]
pub struct ControllerSettings {
    /// A node silent this long is offline.
    pub heartbeat_timeout: Duration,
    /// How often liveness is checked.
    pub check_interval: Duration,
    /// Seconds between a cancel's graceful signal and the kill.
    pub cancel_grace_seconds: u32,
    /// Pack or spread tasks over the nodes they fit on.
    pub placement: Placement,
    /// Queue priorities and limits.
    pub queues: Queues,
}

struct Controller {
    commands: TaskCommands,
    settings: ControllerSettings,
    cluster: Cluster,
    /// Assigned by this instance, not yet seen back in the stream.
    inflight: HashMap<TaskId, NodeId>,
    /// Why each unplaced pending task waits, as last written (its kind: what
    /// keeps it waiting, without counts, so that it is written on change only).
    waiting: HashMap<TaskId, String>,
    /// Last sequences of the node and task streams at start, and how far the
    /// view has applied them: no task is judged before the view is complete.
    targets: HashMap<String, u64>,
    applied: HashMap<String, u64>,
    /// Runs lost with their node, by node: stopped if the node comes back.
    lost: HashMap<NodeId, Vec<TaskId>>,
    /// Assigned tasks not started yet, with when their run was last sent:
    /// sent again after `RESEND_AFTER` (a dispatch whose store was not
    /// confirmed may be missing; a node ignores a run it already has).
    unstarted: HashMap<TaskId, std::time::Instant>,
    /// When each project was last given a node (see `fair_order`).
    served: HashMap<String, u64>,
    serve_counter: u64,
    /// Why tasks wait, written in order by one background writer.
    verdicts: mpsc::UnboundedSender<(TaskId, TaskCommand)>,
    /// Tasks whose verdict the writer could not record: judged afresh.
    unwritten: mpsc::UnboundedReceiver<TaskId>,
    /// Runs and cancels for nodes, published in order by one background publisher.
    dispatches: mpsc::UnboundedSender<Dispatch>,
}

/// Writes the scheduler's verdicts on unplaced tasks, in the order given
/// (the last word on a task is the one kept), retrying conflicts. A verdict
/// it cannot record goes back as `unwritten`, so that the next pass writes it
/// again (the scheduler writes a verdict only when it changes).
async fn write_verdicts(
    commands: TaskCommands,
    mut rx: mpsc::UnboundedReceiver<(TaskId, TaskCommand)>,
    unwritten: mpsc::UnboundedSender<TaskId>,
) {
    while let Some((id, command)) = rx.recv().await {
        let mut written = false;
        for _ in 0..5 {
            match commands
                .execute(id, command.clone(), "scheduler", |_| true)
                .await
            {
                Err(CommandError::Conflict) => continue,
                // Rejected: the task is no longer waiting.
                Ok(_) | Err(CommandError::Rejected(_)) => written = true,
                Err(e) => warn!(task_id = %id, error = %e, "cannot record why the task waits"),
            }
            break;
        }
        if !written {
            let _ = unwritten.send(id);
        }
    }
}

/// How long the queue settings watch may be quiet before it is checked.
const QUEUES_STALL_CHECK: Duration = Duration::from_secs(2);

/// One dispatch to publish: the task and node it is for, its subject, the message.
type Dispatch = ((TaskId, NodeId), String, PublishMessage);

/// Publishes the controller's dispatches in the order it made them, many
/// awaiting the stream's acknowledgement at once, so that scheduling never
/// waits for the hub's disk. One publisher keeps a task's run before its
/// cancel. An unconfirmed run is sent again after `RESEND_AFTER` (its
/// message id keeps a stored one from being stored twice).
async fn publish_dispatches(
    js: async_nats::jetstream::Context,
    mut rx: mpsc::UnboundedReceiver<Dispatch>,
) {
    let dispatches = futures::stream::poll_fn(|cx| rx.poll_recv(cx));
    publish_each(&js, dispatches, DISPATCHES_IN_FLIGHT, |(task, node), r| {
        if let Err(e) = r {
            warn!(task_id = %task, node_id = %node, error = %e, "dispatch not confirmed");
        }
    })
    .await;
}

impl Controller {
    fn usage(&self) -> HashMap<NodeId, Usage> {
        let mut usage = HashMap::new();
        for t in self.cluster.tasks.values() {
            if let Some(node) = t.task.state.live_node() {
                add(&mut usage, node, &t.task.spec);
            }
        }
        for (task, node) in &self.inflight {
            if let Some(t) = self.cluster.tasks.get(task) {
                if t.task.state == TaskState::Pending {
                    add(&mut usage, *node, &t.task.spec);
                }
            }
        }
        usage
    }

    fn send_run(&self, node: NodeId, task: TaskId, attempt: u32, spec: &TaskSpec) {
        self.send_runs(vec![(node, task, attempt, spec.clone())]);
    }

    /// Hands run dispatches to the publisher, in order.
    fn send_runs(&self, runs: Vec<(NodeId, TaskId, u32, TaskSpec)>) {
        for (node, task, attempt, spec) in runs {
            let run = DispatchRun {
                at: now_millis(),
                task_id: task,
                attempt,
                spec,
            };
            let bytes = match dispatch::to_cbor(&run) {
                Ok(b) => b,
                Err(e) => {
                    warn!(task_id = %task, error = %e, "cannot encode dispatch");
                    continue;
                }
            };
            let msg = PublishMessage::build()
                .message_id(format!("run-{task}-{attempt}").as_str())
                .header("Content-Type", "application/cbor")
                .payload(Bytes::from(bytes));
            let subject = edge::dispatch_subject(&node, &task, "run");
            let _ = self.dispatches.send(((task, node), subject, msg));
        }
    }

    fn send_cancel(&self, node: NodeId, task: TaskId, reason: &str) {
        let cancel = DispatchCancel {
            at: now_millis(),
            task_id: task,
            reason: reason.to_owned(),
            grace_seconds: self.settings.cancel_grace_seconds,
        };
        match dispatch::to_cbor(&cancel) {
            Ok(bytes) => {
                let msg = PublishMessage::build()
                    .message_id(format!("cancel-{task}-{}", now_millis()).as_str())
                    .header("Content-Type", "application/cbor")
                    .payload(Bytes::from(bytes));
                let subject = edge::dispatch_subject(&node, &task, "cancel");
                let _ = self.dispatches.send(((task, node), subject, msg));
            }
            Err(e) => warn!(task_id = %task, error = %e, "cannot encode cancel"),
        }
    }

    async fn schedule(&mut self) {
        while let Ok(id) = self.unwritten.try_recv() {
            self.waiting.remove(&id);
        }
        let now = now_millis();
        let mut live: HashMap<&str, usize> = HashMap::new();
        let mut queue_live: HashMap<String, u32> = HashMap::new();
        for t in self
            .cluster
            .tasks
            .values()
            .filter(|t| t.task.state.live_node().is_some())
        {
            *live.entry(t.task.project.as_str()).or_default() += 1;
            *queue_live.entry(t.task.spec.queue.clone()).or_default() += 1;
        }
        // Placed by this instance, not yet seen back: they count against their queue too.
        for id in self.inflight.keys() {
            if let Some(t) = self
                .cluster
                .tasks
                .get(id)
                .filter(|t| t.task.state == TaskState::Pending)
            {
                *queue_live.entry(t.task.spec.queue.clone()).or_default() += 1;
            }
        }
        let queued: Vec<Queued<'_>> = self
            .cluster
            .tasks
            .iter()
            .filter(|(id, t)| t.task.state == TaskState::Pending && !self.inflight.contains_key(id))
            // A retry waits out its backoff (the periodic tick picks it up).
            .filter(|(_, t)| t.task.not_before.is_none_or(|at| at <= now))
            .map(|(id, t)| {
                let project = t.task.project.as_str();
                let (live, served) = (
                    live.get(project).copied().unwrap_or(0),
                    self.served.get(project).copied().unwrap_or(0),
                );
                let queue_priority = self.settings.queues.get(&t.task.spec.queue).priority;
                Queued {
                    id: *id,
                    queue_priority,
                    priority: t.task.spec.priority,
                    project,
                    seq: t.queued_at,
                    live,
                    served,
                }
            })
            .collect();
        if queued.is_empty() {
            return;
        }
        let pending = fair_order(&queued);
        let mut usage = self.usage();
        let online: Vec<Node> = self.cluster.online().map(|e| e.node.clone()).collect();
        let caught_up = self
            .targets
            .iter()
            .all(|(s, t)| self.applied.get(s).copied().unwrap_or(0) >= *t);
        let mut explained: HashMap<Resources, Unplaced> = HashMap::new();
        let mut verdicts = Vec::new();
        let (mut assigns, mut placed) = (Vec::new(), Vec::new());
        for id in pending {
            let Some(entry) = self.cluster.tasks.get(&id) else {
                continue;
            };
            let spec = entry.task.spec.clone();
            // A queue at its limit places nothing more until one of its tasks ends.
            if let Some(limit) = self.settings.queues.get(&spec.queue).max_running {
                if queue_live.get(&spec.queue).copied().unwrap_or(0) >= limit {
                    let kind = format!("queue {} at its limit", spec.queue);
                    if caught_up && self.waiting.get(&id) != Some(&kind) {
                        let reason =
                            format!("queue {} runs its limit of {limit} tasks", spec.queue);
                        self.waiting.insert(id, kind);
                        verdicts.push((id, TaskCommand::Wait { reason }));
                    }
                    continue;
                }
            }
            let Some(node) = place(
                online.iter(),
                &usage,
                &spec.resources,
                self.settings.placement,
            ) else {
                if caught_up {
                    let why = explained
                        .entry(spec.resources.clone())
                        .or_insert_with(|| {
                            explain(
                                self.cluster.nodes.values().map(|e| &e.node),
                                &usage,
                                &spec.resources,
                            )
                        })
                        .clone();
                    let (kind, command) = match why {
                        Unplaced::Never(reason) => {
                            ("never".to_owned(), TaskCommand::Unschedulable { reason })
                        }
                        Unplaced::Waits { reason, kind } => (kind, TaskCommand::Wait { reason }),
                    };
                    if self.waiting.get(&id) != Some(&kind) {
                        self.waiting.insert(id, kind);
                        verdicts.push((id, command));
                    }
                }
                continue;
            };
            // Decided here against this view; the append's concurrency
            // check (the task's last sequence as seen) refuses it if the
            // task changed meanwhile.
            let events = match task::decide(
                Some(&entry.task),
                TaskCommand::Assign { node_id: node },
                now,
            ) {
                Ok(events) if events.len() == 1 => events,
                _ => continue,
            };
            add(&mut usage, node, &spec);
            *queue_live.entry(spec.queue.clone()).or_default() += 1;
            self.serve_counter += 1;
            self.served
                .insert(entry.task.project.to_string(), self.serve_counter);
            let attempt = entry.task.attempts + 1;
            let meta = EventMeta::new("scheduler");
            let mut after = Some(entry.task.clone());
            for e in events {
                after = task::evolve(after, id, &e);
                assigns.push((Event::Task(id, e), meta.clone(), Expect::LastSeq(entry.seq)));
            }
            placed.push((id, node, attempt, spec, after));
        }
        // Every placement of this pass appended at once, many in flight.
        let results = self
            .commands
            .store()
            .append_pipelined(assigns, PLACEMENTS_IN_FLIGHT)
            .await;
        let mut runs = Vec::with_capacity(placed.len());
        for ((id, node, attempt, spec, after), r) in placed.into_iter().zip(results) {
            match r {
                Ok(seq) => {
                    info!(task_id = %id, node_id = %node, attempt, "task assigned");
                    if let Some(t) = after {
                        self.commands.remember(t, seq);
                    }
                    self.inflight.insert(id, node);
                    runs.push((node, id, attempt, spec));
                }
                Err(crate::StoreError::Conflict) => {}
                Err(e) => warn!(task_id = %id, error = %e, "cannot assign"),
            }
        }
        // Published in the background: the next pass does not wait for them.
        self.send_runs(runs);
        // Written in the background: placements do not wait for them.
        for v in verdicts {
            let _ = self.verdicts.send(v);
        }
    }

    /// Applies one update; says whether it may change what can be placed
    /// (a heartbeat does only when it makes its node take tasks or stop).
    async fn on_update(&mut self, u: &Update) -> bool {
        let before = match &u.envelope.event {
            ud_schemas::Event::Task(id, _) => {
                self.cluster.tasks.get(id).map(|t| t.task.state.clone())
            }
            _ => None,
        };
        let node_before = match &u.envelope.event {
            ud_schemas::Event::Node(id, _) => self
                .cluster
                .nodes
                .get(id)
                .map(|n| (n.node.liveness(), n.node.takes_new_tasks())),
            _ => None,
        };
        self.cluster.apply(u);
        let relevant = match &u.envelope.event {
            ud_schemas::Event::Node(id, ud_schemas::NodeEvent::Heartbeat(_)) => {
                node_before.map(|b| b.1)
                    != self.cluster.nodes.get(id).map(|n| n.node.takes_new_tasks())
            }
            _ => true,
        };
        let node_before = node_before.map(|b| b.0);
        if let ud_schemas::Event::Task(id, ud_schemas::TaskEvent::Lost(l)) = &u.envelope.event {
            self.lost.entry(l.node_id).or_default().push(*id);
        }
        if let ud_schemas::Event::Node(node, e) = &u.envelope.event {
            let now = self.cluster.nodes.get(node).map(|n| n.node.liveness());
            if u.live {
                match e {
                    // Its tasks are placed anew.
                    ud_schemas::NodeEvent::WentOffline(_) => self.lose_tasks_of(*node).await,
                    // Back with runs that lost the race: stop them.
                    _ if node_before == Some(crate::node::Liveness::Offline)
                        && now == Some(crate::node::Liveness::Online) =>
                    {
                        self.stop_lost_runs(*node).await;
                    }
                    _ => {}
                }
            }
        }
        let applied = self.applied.entry(u.stream.clone()).or_default();
        *applied = (*applied).max(u.seq);
        if let ud_schemas::Event::Task(id, e) = &u.envelope.event {
            if !matches!(
                self.cluster.tasks.get(id).map(|t| &t.task.state),
                Some(TaskState::Pending)
            ) {
                self.inflight.remove(id);
                self.waiting.remove(id);
            }
            match self.cluster.tasks.get(id).map(|t| &t.task.state) {
                Some(TaskState::Assigned { .. }) => {
                    self.unstarted
                        .entry(*id)
                        .or_insert_with(std::time::Instant::now);
                }
                _ => {
                    self.unstarted.remove(id);
                }
            }
            // Dispatches lost in a crash between assignment and send are sent again on start.
            if !u.live {
                return relevant;
            }
            if let (
                ud_schemas::TaskEvent::CancelRequested(c),
                Some(TaskState::Assigned { node_id, .. } | TaskState::Running { node_id, .. }),
            ) = (e, before)
            {
                self.send_cancel(node_id, *id, &c.reason);
            }
        }
        relevant
    }

    async fn lose_tasks_of(&mut self, node: NodeId) {
        let tasks: Vec<TaskId> = self
            .cluster
            .tasks
            .iter()
            .filter(|(_, t)| t.task.state.live_node() == Some(node))
            .map(|(id, _)| *id)
            .collect();
        for id in tasks {
            let command = TaskCommand::Lose {
                node_id: node,
                reason: format!("node {node} went offline"),
            };
            match self
                .commands
                .execute(id, command, "scheduler", |_| true)
                .await
            {
                Ok(_) => {
                    info!(task_id = %id, node_id = %node, "task lost with its node; placing it again")
                }
                Err(CommandError::Conflict | CommandError::Rejected(_)) => {}
                Err(e) => {
                    warn!(task_id = %id, node_id = %node, error = %e, "cannot mark the task lost")
                }
            }
        }
    }

    async fn stop_lost_runs(&mut self, node: NodeId) {
        for id in self.lost.remove(&node).unwrap_or_default() {
            // Placed on this very node again: that run is the live one.
            let live_here = self
                .cluster
                .tasks
                .get(&id)
                .is_some_and(|t| t.task.state.live_node() == Some(node));
            if !live_here {
                info!(task_id = %id, node_id = %node, "stopping a run lost with its node");
                self.send_cancel(
                    node,
                    id,
                    "the run was lost with its node and placed elsewhere",
                );
            }
        }
    }

    /// Sends again the runs of tasks assigned long ago and not started.
    async fn resend_overdue(&mut self) {
        let mut runs = Vec::new();
        for (id, since) in self.unstarted.iter_mut() {
            if since.elapsed() < RESEND_AFTER {
                continue;
            }
            if let Some(TaskState::Assigned { node_id, attempt }) =
                self.cluster.tasks.get(id).map(|t| &t.task.state)
            {
                let spec = self.cluster.tasks.get(id).map(|t| t.task.spec.clone());
                if let Some(spec) = spec {
                    runs.push((*node_id, *id, *attempt, spec));
                    *since = std::time::Instant::now();
                }
            }
        }
        if !runs.is_empty() {
            info!(runs = runs.len(), "sending runs not started in time again");
            self.send_runs(runs);
        }
    }

    async fn resend_unstarted(&self) {
        for (id, t) in &self.cluster.tasks {
            match &t.task.state {
                TaskState::Assigned { node_id, attempt } => {
                    self.send_run(*node_id, *id, *attempt, &t.task.spec)
                }
                TaskState::Cancelling { node_id, .. } => {
                    self.send_cancel(*node_id, *id, "cancel requested")
                }
                _ => {}
            }
        }
    }
}

/// Follows the `ud_queues` bucket (every queue's last value, then changes)
/// and sends each queue's settings; binds again when the watch ends, or when
/// it has gone quiet while the bucket changed (a hub reload can drop the
/// watch's consumer without the client noticing for a while).
async fn watch_queues(
    js: async_nats::jetstream::Context,
    tx: mpsc::Sender<(String, Option<QueueConfig>)>,
) {
    use futures::StreamExt;
    // The bucket's last sequence when the watch was last bound anew for
    // being behind it: if that message is gone (a compaction), a fresh watch
    // never reaches it, and is not behind for that.
    let mut rebound_at = 0;
    loop {
        let kv = js.get_key_value(streams::QUEUES_BUCKET).await.ok();
        let watch = match &kv {
            Some(kv) => kv.watch_with_history(">").await.ok(),
            None => None,
        };
        if let (Some(kv), Some(mut entries)) = (kv, watch) {
            let mut seen = 0;
            loop {
                let entry = match tokio::time::timeout(QUEUES_STALL_CHECK, entries.next()).await {
                    Ok(Some(Ok(entry))) => entry,
                    Ok(_) => break,
                    Err(_) => match kv.status().await {
                        Ok(s) if s.info.state.last_sequence > seen.max(rebound_at) => {
                            rebound_at = s.info.state.last_sequence;
                            warn!("queue settings watch stalled; watching again");
                            break;
                        }
                        _ => continue,
                    },
                };
                seen = entry.revision;
                let config = match entry.operation {
                    async_nats::jetstream::kv::Operation::Put => {
                        match serde_json::from_slice::<QueueRecord>(&entry.value) {
                            Ok(r) => Some(QueueConfig {
                                priority: r.priority,
                                max_running: r.max_running,
                            }),
                            Err(e) => {
                                warn!(queue = %entry.key, error = %e, "unreadable queue settings ignored");
                                continue;
                            }
                        }
                    }
                    _ => None,
                };
                if tx.send((entry.key.clone(), config)).await.is_err() {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs liveness and first-fit scheduling until the streams end.
pub async fn run(commands: TaskCommands, settings: ControllerSettings) {
    let (tx, mut rx) = mpsc::channel::<Update>(65_536);
    let js = commands.store().jetstream().clone();
    for stream in [streams::NODES, streams::HEARTBEATS, streams::TASKS] {
        let (js, tx) = (js.clone(), tx.clone());
        tokio::spawn(async move {
            if let Err(e) = view::follow(js, stream, tx).await {
                warn!(stream, error = %e, "controller stopped following");
            }
        });
    }
    drop(tx);
    let mut targets = HashMap::new();
    for stream in [streams::NODES, streams::TASKS] {
        // The hub's JetStream can be briefly away (a reload): ask again.
        let mut last = None;
        for _ in 0..50 {
            if let Ok(mut s) = js.get_stream(stream).await {
                if let Ok(info) = s.info().await {
                    last = Some(info.state.last_sequence);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if last.is_none() {
            warn!(
                stream,
                "cannot learn where the stream ends; judging unplaced tasks from now on"
            );
        }
        targets.insert(stream.to_owned(), last.unwrap_or(0));
    }
    let (verdicts, verdicts_rx) = mpsc::unbounded_channel();
    let (unwritten_tx, unwritten) = mpsc::unbounded_channel();
    tokio::spawn(write_verdicts(commands.clone(), verdicts_rx, unwritten_tx));
    let (dispatches, dispatches_rx) = mpsc::unbounded_channel();
    tokio::spawn(publish_dispatches(js.clone(), dispatches_rx));
    let mut c = Controller {
        verdicts,
        unwritten,
        dispatches,
        commands,
        settings,
        cluster: Cluster::default(),
        inflight: HashMap::new(),
        waiting: HashMap::new(),
        served: HashMap::new(),
        serve_counter: 0,
        targets,
        applied: HashMap::new(),
        lost: HashMap::new(),
        unstarted: HashMap::new(),
    };
    let (queue_tx, mut queue_rx) = mpsc::channel(256);
    tokio::spawn(watch_queues(js.clone(), queue_tx));
    let mut tick = tokio::time::interval(c.settings.check_interval);
    let mut resent = false;
    loop {
        tokio::select! {
            Some((name, config)) = queue_rx.recv() => {
                info!(queue = %name, ?config, "queue settings changed");
                c.settings.queues.set(&name, config);
                c.schedule().await;
            }
            u = rx.recv() => {
                let Some(u) = u else { break };
                let mut relevant = c.on_update(&u).await;
                while let Ok(more) = rx.try_recv() {
                    relevant |= c.on_update(&more).await;
                }
                // Heartbeats alone change nothing to place; the tick looks anyway.
                if relevant {
                    c.schedule().await;
                }
            }
            _ = tick.tick() => {
                if !resent {
                    c.resend_unstarted().await;
                    resent = true;
                }
                let timeout = i64::try_from(c.settings.heartbeat_timeout.as_millis()).unwrap_or(i64::MAX);
                super::liveness::check(c.commands.store(), &c.cluster, now_millis(), timeout).await;
                c.resend_overdue().await;
                c.schedule().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use ud_schemas::spec::Gpu;
    use ud_schemas::NodeResources;

    use super::*;

    fn node(cpu: u32, mem: u64, gpus: usize, zone: &str) -> Node {
        Node {
            id: NodeId::new(),
            name: "n".into(),
            labels: BTreeMap::from([("zone".into(), zone.into())]),
            resources: Some(NodeResources {
                cpu_millis: cpu,
                memory_mb: mem,
                gpus: (0..gpus)
                    .map(|_| Gpu {
                        model: "A100".into(),
                        memory_mb: 1,
                    })
                    .collect(),
                ..Default::default()
            }),
            last_seen: Some(1),
            offline_after: None,
            revoked: false,
            low_disk: false,
            scheduling: "active".into(),
            disk_free_mb: Some(1_000_000),
        }
    }

    fn req(cpu: u32, mem: u64, gpus: u32) -> Resources {
        Resources {
            cpu_millis: cpu,
            memory_mb: mem,
            gpus,
            gpu_model: None,
            labels: BTreeMap::new(),
            preferred_labels: BTreeMap::new(),
            disk_mb: 0,
        }
    }

    proptest! {
        #[test]
        fn fair_order_puts_priority_first_and_lets_projects_take_turns(
            items in proptest::collection::vec((0i32..3, 0usize..4, 0u64..1000), 0..60)
        ) {
            let projects = ["a", "b", "c", "d"];
            let tasks: Vec<Queued<'_>> = items.iter().enumerate()
                .map(|(i, (p, proj, seq))| Queued { id: TaskId::new(), queue_priority: 0, priority: *p, project: projects[*proj], seq: seq * 100 + i as u64, live: 0, served: 0 })
                .collect();
            let order = fair_order(&tasks);
            // A permutation.
            prop_assert_eq!(order.len(), tasks.len());
            let pos: HashMap<TaskId, usize> = order.iter().enumerate().map(|(i, id)| (*id, i)).collect();
            prop_assert_eq!(pos.len(), tasks.len());
            for a in &tasks {
                for b in &tasks {
                    let (pa, pb) = (pos[&a.id], pos[&b.id]);
                    // Higher priority first.
                    if a.priority > b.priority { prop_assert!(pa < pb); }
                    // Within a project and priority, submission order.
                    if a.priority == b.priority && a.project == b.project && a.seq < b.seq { prop_assert!(pa < pb); }
                }
            }
            // Turns: at one priority, a project's (k+1)-th task never comes
            // before another project's k-th.
            for a in &tasks {
                for b in &tasks {
                    if a.priority != b.priority || a.project == b.project { continue; }
                    let turn = |t: &Queued<'_>| tasks.iter().filter(|u| u.priority == t.priority && u.project == t.project && u.seq < t.seq).count();
                    if turn(a) < turn(b) { prop_assert!(pos[&a.id] < pos[&b.id]); }
                }
            }
        }
    }

    #[test]
    fn queue_priority_comes_before_task_priority_and_queue_files_are_checked() {
        let q = |queue_priority, priority, seq| Queued {
            id: TaskId::new(),
            queue_priority,
            priority,
            project: "p",
            seq,
            live: 0,
            served: 0,
        };
        let tasks = [q(0, 100, 1), q(10, -5, 2), q(10, 0, 3)];
        assert_eq!(
            fair_order(&tasks),
            vec![tasks[2].id, tasks[1].id, tasks[0].id]
        );
        let queues = Queues::parse(
            r#"{"queues": {"gpu": {"priority": 10, "max_running": 2}, "batch": {}}}"#,
        )
        .unwrap_or_default();
        assert_eq!(
            queues.get("gpu"),
            QueueConfig {
                priority: 10,
                max_running: Some(2)
            }
        );
        assert_eq!(queues.get("unknown"), QueueConfig::default());
        assert!(Queues::parse(r#"{"queues": {"gpu": {"prio": 1}}}"#).is_err());
        assert!(Queues::parse("[]").is_err());
    }

    #[test]
    fn one_projects_flood_does_not_starve_another() {
        let mut tasks: Vec<Queued<'_>> = (0..10_000)
            .map(|i| Queued {
                id: TaskId::new(),
                queue_priority: 0,
                priority: 0,
                project: "big",
                seq: i,
                live: 0,
                served: 0,
            })
            .collect();
        let small = TaskId::new();
        tasks.push(Queued {
            id: small,
            queue_priority: 0,
            priority: 0,
            project: "small",
            seq: 20_000,
            live: 0,
            served: 0,
        });
        let order = fair_order(&tasks);
        assert_eq!(order.iter().position(|id| *id == small), Some(1));
        // A project that runs many now, or was served more recently, waits its turn.
        for t in tasks.iter_mut().filter(|t| t.project == "big") {
            t.live = 3;
        }
        assert_eq!(fair_order(&tasks).first(), Some(&small));
        for t in tasks.iter_mut() {
            (t.live, t.served) = (0, if t.project == "big" { 7 } else { 3 });
        }
        assert_eq!(fair_order(&tasks).first(), Some(&small));
    }

    #[test]
    fn unplaced_tasks_say_why_and_impossible_ones_are_told_apart() {
        let small = node(1000, 1024, 0, "a");
        let gpu = node(8000, 65536, 2, "b");
        let none = HashMap::new();
        // Nothing enrolled: wait (the platform is being set up).
        assert!(
            matches!(explain([].iter(), &none, &req(1000, 1, 0)), Unplaced::Waits { reason: r, .. } if r.contains("no compute node"))
        );
        // More GPUs than any node has: never.
        let never = explain([small.clone(), gpu.clone()].iter(), &none, &req(1000, 1, 4));
        assert!(
            matches!(&never, Unplaced::Never(r) if r.contains("4 GPUs") && r.contains("GPUs 2")),
            "{never:?}"
        );
        // A label no node has: never.
        let mut zoned = req(100, 1, 0);
        zoned.labels.insert("zone".into(), "c".into());
        assert!(
            matches!(explain([small.clone()].iter(), &none, &zoned), Unplaced::Never(r) if r.contains("labels"))
        );
        // Fits the GPU node, which is busy: waits, and says so.
        let busy = HashMap::from([(
            gpu.id,
            Usage {
                cpu_millis: 8000,
                ..Default::default()
            },
        )]);
        let waits = explain([small.clone(), gpu.clone()].iter(), &busy, &req(2000, 1, 0));
        assert!(
            matches!(&waits, Unplaced::Waits { reason: r, .. } if r.contains("1 of 2") && r.contains("busy 1")),
            "{waits:?}"
        );
        // Cordoned, offline and unregistered nodes that could run it: waits.
        let mut cordoned = gpu.clone();
        cordoned.scheduling = "cordoned".into();
        let mut offline = gpu.clone();
        offline.offline_after = Some(5);
        let mut unknown = gpu.clone();
        unknown.resources = None;
        let waits = explain([cordoned, offline, unknown].iter(), &none, &req(2000, 1, 1));
        assert!(
            matches!(&waits, Unplaced::Waits { reason: r, .. } if r.contains("cordoned 1") && r.contains("offline 1") && r.contains("not registered yet 1")),
            "{waits:?}"
        );
    }

    #[test]
    fn disk_requests_fit_the_free_disk_nodes_report() {
        let mut n = node(8000, 16000, 0, "a");
        n.disk_free_mb = Some(10_000);
        let mut r = req(1000, 1, 0);
        r.disk_mb = 6_000;
        assert!(fits(&n, Usage::default(), &r));
        // What a task placed since the last heartbeat asked for counts too.
        assert!(!fits(
            &n,
            Usage {
                disk_mb: 6_000,
                ..Default::default()
            },
            &r
        ));
        n.disk_free_mb = None;
        assert!(
            !fits(&n, Usage::default(), &r),
            "unknown free disk does not fit a disk request"
        );
        assert!(
            fits(&n, Usage::default(), &req(1000, 1, 0)),
            "no disk asked, none needed"
        );
        if let Some(res) = n.resources.as_mut() {
            res.disk_mb = 5_000;
        }
        assert!(
            matches!(explain([n].iter(), &HashMap::new(), &r), Unplaced::Never(w) if w.contains("disk"))
        );
    }

    #[test]
    fn preferred_labels_then_pack_or_spread_choose_among_fitting_nodes() {
        let a = node(8000, 16000, 0, "a");
        let b = node(8000, 16000, 0, "b");
        let nodes = [a.clone(), b.clone()];
        // b is half full: pack goes there, spread goes to a.
        let usage = HashMap::from([(
            b.id,
            Usage {
                cpu_millis: 4000,
                ..Default::default()
            },
        )]);
        assert_eq!(
            place(nodes.iter(), &usage, &req(1000, 1, 0), Placement::Pack),
            Some(b.id)
        );
        assert_eq!(
            place(nodes.iter(), &usage, &req(1000, 1, 0), Placement::Spread),
            Some(a.id)
        );
        // A preferred label outweighs both, while that node has room.
        let mut prefers_a = req(1000, 1, 0);
        prefers_a.preferred_labels.insert("zone".into(), "a".into());
        assert_eq!(
            place(nodes.iter(), &usage, &prefers_a, Placement::Pack),
            Some(a.id)
        );
        let full_a = HashMap::from([(
            a.id,
            Usage {
                cpu_millis: 8000,
                ..Default::default()
            },
        )]);
        assert_eq!(
            place(nodes.iter(), &full_a, &prefers_a, Placement::Pack),
            Some(b.id)
        );
        assert_eq!("spread".parse::<Placement>(), Ok(Placement::Spread));
        assert!("random".parse::<Placement>().is_err());
    }

    #[test]
    fn labels_models_and_capacity_decide() {
        let small = node(1000, 1024, 0, "a");
        let gpu = node(8000, 65536, 2, "b");
        let nodes = [small.clone(), gpu.clone()];
        let none = HashMap::new();
        assert_eq!(
            place(nodes.iter(), &none, &req(4000, 1024, 0), Placement::Pack),
            Some(gpu.id)
        );
        let mut zoned = req(500, 512, 0);
        zoned.labels.insert("zone".into(), "a".into());
        assert_eq!(
            place(nodes.iter(), &none, &zoned, Placement::Pack),
            Some(small.id)
        );
        let mut model = req(500, 512, 1);
        model.gpu_model = Some("H100".into());
        assert_eq!(place(nodes.iter(), &none, &model, Placement::Pack), None);
        let full = HashMap::from([(
            gpu.id,
            Usage {
                cpu_millis: 8000,
                ..Default::default()
            },
        )]);
        assert_eq!(
            place(nodes.iter(), &full, &req(4000, 1024, 0), Placement::Pack),
            None
        );
    }

    proptest! {
        /// Placing tasks one after another never over-commits a node.
        #[test]
        fn never_over_commits(reqs in proptest::collection::vec((1u32..4000, 1u64..8000, 0u32..3), 1..60), spread in any::<bool>()) {
            let strategy = if spread { Placement::Spread } else { Placement::Pack };
            let nodes = [node(8000, 16000, 2, "a"), node(4000, 8000, 0, "a"), node(16000, 32000, 4, "b")];
            let mut usage: HashMap<NodeId, Usage> = HashMap::new();
            for (cpu, mem, gpus) in reqs {
                let r = req(cpu, mem, gpus);
                if let Some(id) = place(nodes.iter(), &usage, &r, strategy) {
                    let u = usage.entry(id).or_default();
                    u.cpu_millis += u64::from(cpu);
                    u.memory_mb += mem;
                    u.gpus += u64::from(gpus);
                }
            }
            for n in &nodes {
                let u = usage.get(&n.id).copied().unwrap_or_default();
                let res = n.resources.as_ref().unwrap_or_else(|| unreachable!());
                prop_assert!(u.cpu_millis <= u64::from(res.cpu_millis));
                prop_assert!(u.memory_mb <= res.memory_mb);
                prop_assert!(u.gpus <= res.gpus.len() as u64);
            }
        }
    }
}
