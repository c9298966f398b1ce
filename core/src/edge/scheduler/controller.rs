//! The controller loop on the main server: follows the streams, runs
//! liveness, and places pending tasks with the pure policy of the parent module.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use backon::Retryable;
use tokio::sync::mpsc;
use tracing::{info, warn};
use ud_schemas::codec::EventMeta;
use ud_schemas::{now_millis, streams, NodeId, TaskId};

use super::plan::{self, Memory, Rules};
use super::quota::{Quota, QuotaRecord, Quotas};
use super::{Placement, QueueConfig, QueueRecord, Queues};
use crate::aggregate::{Against, ExecuteError, Executed, Repository, Retries};
use crate::commands::TaskCommands;
use crate::edge::nats_err;
use crate::edge::view::{self, Cluster, Update};
use crate::node::Node;
use crate::store::publish_each;
use crate::task::{Task, TaskCommand, TaskState};

/// An assigned task whose node has not started it gets its run again after this.
const RESEND_AFTER: Duration = Duration::from_secs(30);

/// Assignments of one scheduling pass in flight at once.
const PLACEMENTS_IN_FLIGHT: usize = 256;
/// Scheduling passes whose assignments may await the stream at once: a task
/// submitted while one pass waits for the hub's disk (or a cluster's commit)
/// is placed by the next instead of waiting for it, and passes stay few.
const PASSES_IN_FLIGHT: usize = 2;
/// Run dispatches awaiting the stream's acknowledgement at once.
const DISPATCHES_IN_FLIGHT: usize = 256;

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
    /// How long a run whose node went offline stays `disconnected` before
    /// its task is lost, unless its task or queue says otherwise.
    pub lost_after: Duration,
    /// The longest any task or queue may ask for.
    pub max_lost_after: Duration,
}

/// What a pass in flight reports back to the controller.
#[allow(clippy::large_enum_variant)] // one per assignment, read at once
enum PassNews {
    /// One assignment's append came back.
    Appended {
        id: TaskId,
        node: NodeId,
        result: Result<Executed<Task>, ExecuteError<crate::task::TaskError>>,
    },
    /// Every assignment of the pass came back.
    Done,
    /// The tasks of a lost node are marked lost (or were found changed).
    Lost(Vec<TaskId>),
    /// How tasks others run after ended (`None`: not ended, or not found).
    Ended(Vec<(TaskId, Option<ud_schemas::TaskStatus>)>),
}

struct Controller {
    tasks: Repository<Task>,
    nodes: Repository<Node>,
    settings: ControllerSettings,
    /// Compute quotas per project, as the `ud_quotas` bucket says.
    quotas: Quotas,
    cluster: Cluster,
    /// Assigned by this instance (or being assigned), not yet seen back in
    /// the stream: not placed again, and counted against their node.
    inflight: plan::InFlight,
    /// Being assigned, the append not yet answered, with the cancels asked
    /// for meanwhile: they go to the node after the run, never before it.
    placing: HashMap<TaskId, Vec<(NodeId, Option<u32>, String)>>,
    /// Passes whose appends are on their way, and where they report.
    passes: usize,
    pass_news: mpsc::UnboundedSender<PassNews>,
    /// A pass is due (something changed what can be placed).
    wanted: bool,
    /// What passes remember (turns of projects, what waiting tasks were told).
    memory: Memory,
    /// Tasks being marked lost in the background: not marked again meanwhile.
    losing: HashSet<TaskId>,
    /// How tasks that pending ones run after ended (kept while a pending
    /// task names them).
    ended: HashMap<TaskId, ud_schemas::TaskStatus>,
    /// Being looked up in the store.
    looking_up: HashSet<TaskId>,
    /// Last sequences of the node and task streams at start, and how far the
    /// view has applied them: no task is judged before the view is complete.
    targets: HashMap<String, u64>,
    applied: HashMap<String, u64>,
    /// Runs lost with their node (task and attempt), by node: stopped if
    /// the node comes back.
    lost: HashMap<NodeId, Vec<(TaskId, u32)>>,
    /// Assigned tasks not started yet, with when their run was last sent:
    /// sent again after `RESEND_AFTER` (a dispatch whose store was not
    /// confirmed may be missing; a node ignores a run it already has).
    unstarted: HashMap<TaskId, std::time::Instant>,
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
    tasks: Repository<Task>,
    mut rx: mpsc::UnboundedReceiver<(TaskId, TaskCommand)>,
    unwritten: mpsc::UnboundedSender<TaskId>,
) {
    while let Some((id, command)) = rx.recv().await {
        // Each event its own id: the stream drops a second one with the same.
        let meta = EventMeta::new("scheduler");
        match tasks
            .execute(id, command, &meta, Retries(4), |_| true)
            .await
        {
            // Rejected: the task is no longer waiting.
            Ok(_) | Err(ExecuteError::Rejected(_)) => {}
            Err(e) => {
                warn!(task_id = %id, error = %e, "cannot record why the task waits");
                let _ = unwritten.send(id);
            }
        }
    }
}

/// How long the queue settings watch may be quiet before it is checked.
const WATCH_STALL_CHECK: Duration = Duration::from_secs(2);

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
    /// Hands the run of a task's live assignment on `node` to the publisher.
    fn send_run(&self, node: NodeId, task: &Task) {
        let run = crate::edge::dispatch::run(
            &node,
            task,
            // The node stops the run itself when cut off as long as the
            // platform waits for it before placing it elsewhere.
            Some((self.settings.heartbeat_timeout + self.grace_of(&task.spec)).as_secs()),
        );
        match run {
            Ok((subject, msg)) => {
                let _ = self.dispatches.send(((task.id, node), subject, msg));
            }
            Err(e) => warn!(task_id = %task.id, error = %e, "cannot encode dispatch"),
        }
    }

    /// Forgets how tasks ended that no pending task runs after any more.
    fn prune_ended(&mut self) {
        if self.ended.is_empty() {
            return;
        }
        let named: HashSet<TaskId> = self
            .cluster
            .tasks
            .values()
            .filter(|t| t.task.state == TaskState::Pending)
            .flat_map(|t| t.task.spec.after.iter().map(|a| a.task))
            .collect();
        self.ended.retain(|id, _| named.contains(id));
    }

    /// Looks up, in the background, how the tasks `ids` ended (tasks pending
    /// ones run after that the view no longer holds).
    fn look_up_ended(&mut self, ids: Vec<TaskId>) {
        let wanted: Vec<TaskId> = ids
            .into_iter()
            .filter(|id| self.looking_up.insert(*id))
            .collect();
        if wanted.is_empty() {
            return;
        }
        let (tasks, news) = (self.tasks.clone(), self.pass_news.clone());
        tokio::spawn(async move {
            let mut found = Vec::with_capacity(wanted.len());
            for id in wanted {
                let status = match tasks.load(&id).await {
                    Ok(Some((t, _))) if t.state.is_terminal() => Some(t.state.status()),
                    Ok(_) => None,
                    Err(e) => {
                        warn!(task_id = %id, error = %e, "cannot read a task others run after");
                        None
                    }
                };
                found.push((id, status));
            }
            let _ = news.send(PassNews::Ended(found));
        });
    }

    /// How long a run of `spec` waits for its node: the task's grace, else
    /// its queue's, else the platform's, at most the longest allowed.
    fn grace_of(&self, spec: &ud_schemas::TaskSpec) -> Duration {
        let seconds = spec
            .lost_after_seconds
            .or_else(|| self.settings.queues.get(&spec.queue).lost_after_seconds);
        seconds
            .map_or(self.settings.lost_after, Duration::from_secs)
            .min(self.settings.max_lost_after)
    }

    /// Sends a cancel of `attempt` (none: whichever runs) to `node`, after
    /// the run if the task is still being placed.
    fn send_cancel(&mut self, node: NodeId, task: TaskId, attempt: Option<u32>, reason: &str) {
        match self.placing.get_mut(&task) {
            Some(held) => held.push((node, attempt, reason.to_owned())),
            None => self.publish_cancel(node, task, attempt, reason),
        }
    }

    fn publish_cancel(&self, node: NodeId, task: TaskId, attempt: Option<u32>, reason: &str) {
        let grace = self.settings.cancel_grace_seconds;
        match crate::edge::dispatch::cancel(&node, task, attempt, reason, grace) {
            Ok((subject, msg)) => {
                let _ = self.dispatches.send(((task, node), subject, msg));
            }
            Err(e) => warn!(task_id = %task, error = %e, "cannot encode cancel"),
        }
    }

    /// Decides a pass against the view and sends its assignments on their
    /// way, unless `PASSES_IN_FLIGHT` passes wait already (then the pass
    /// stays due and runs when one of them is done).
    fn schedule(&mut self) {
        if self.passes >= PASSES_IN_FLIGHT {
            self.wanted = true;
            return;
        }
        self.wanted = false;
        while let Ok(id) = self.unwritten.try_recv() {
            self.memory.waiting.remove(&id);
        }
        let rules = Rules {
            placement: self.settings.placement,
            queues: &self.settings.queues,
            quotas: &self.quotas,
            caught_up: self.caught_up(),
            now: now_millis(),
            ended: &self.ended,
        };
        let plan = plan::plan(&self.cluster, &self.inflight, &rules, &mut self.memory);
        self.look_up_ended(plan.look_up);
        // Written in the background: placements do not wait for them.
        for v in plan.verdicts {
            let _ = self.verdicts.send(v);
        }
        if plan.assign.is_empty() {
            return;
        }
        let mut placed = Vec::with_capacity(plan.assign.len());
        let mut assigns = Vec::with_capacity(plan.assign.len());
        for (id, node, devices) in plan.assign {
            let Some(entry) = self.cluster.tasks.get(&id) else {
                continue;
            };
            // Decided against this view; the append's concurrency check
            // (the task's last sequence as seen) refuses it if the task
            // changed meanwhile.
            assigns.push(Against {
                id,
                state: Some(entry.task.clone()),
                seq: entry.seq,
                command: TaskCommand::Assign {
                    node_id: node,
                    gpus: devices.clone(),
                },
                meta: EventMeta::new("scheduler"),
            });
            placed.push((id, node));
            self.inflight.insert(id, (node, devices));
            self.placing.insert(id, Vec::new());
        }
        // Every placement of this pass appended at once, many in flight, each
        // reported as it comes back (its run goes out then).
        self.passes += 1;
        let (tasks, news) = (self.tasks.clone(), self.pass_news.clone());
        tokio::spawn(async move {
            tasks
                .execute_each(assigns, PLACEMENTS_IN_FLIGHT, Retries(0), |i, result| {
                    if let Some((id, node)) = placed.get(i).copied() {
                        let _ = news.send(PassNews::Appended { id, node, result });
                    }
                })
                .await;
            let _ = news.send(PassNews::Done);
        });
    }

    /// What a pass in flight reported: an assignment stored sends its run
    /// (then any cancel asked for meanwhile); one refused frees its task for
    /// the next pass.
    fn on_pass_news(&mut self, news: PassNews) {
        let (id, node, result) = match news {
            PassNews::Done => {
                self.passes = self.passes.saturating_sub(1);
                return;
            }
            PassNews::Lost(ids) => {
                for id in ids {
                    self.losing.remove(&id);
                }
                return;
            }
            PassNews::Ended(found) => {
                for (id, status) in found {
                    self.looking_up.remove(&id);
                    if let Some(status) = status {
                        self.ended.insert(id, status);
                        self.wanted = true;
                    }
                }
                return;
            }
            PassNews::Appended { id, node, result } => (id, node, result),
        };
        let held = self.placing.remove(&id).unwrap_or_default();
        match result {
            Ok(Executed {
                state: Some(task), ..
            }) => {
                info!(task_id = %id, node_id = %node, attempt = task.attempts, gpus = ?task.gpus, "task assigned");
                self.send_run(node, &task);
            }
            other => {
                if let Err(e) = other.as_ref().map(|_| ()) {
                    if !matches!(e, ExecuteError::Conflict) {
                        warn!(task_id = %id, error = %e, "cannot assign");
                    }
                }
                // The task changed meanwhile (or the store failed): judged again.
                self.inflight.remove(&id);
                self.wanted = true;
            }
        }
        for (node, attempt, reason) in held {
            self.publish_cancel(node, id, attempt, &reason);
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
            self.lost
                .entry(l.node_id)
                .or_default()
                .push((*id, l.attempt));
        }
        if let ud_schemas::Event::Node(node, e) = &u.envelope.event {
            let now = self.cluster.nodes.get(node).map(|n| n.node.liveness());
            if u.live {
                match e {
                    // Its runs wait for it, or their tasks are placed anew.
                    ud_schemas::NodeEvent::WentOffline(_) => {
                        let node = *node;
                        self.settle_tasks_on(|n| n == node, |_| false)
                    }
                    // Back: its waiting runs go on, those that lost the race stop.
                    _ if node_before == Some(crate::node::Liveness::Offline)
                        && now == Some(crate::node::Liveness::Online) =>
                    {
                        let node = *node;
                        self.settle_tasks_on(|_| false, |n| n == node);
                        self.stop_lost_runs(node).await;
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
                self.memory.waiting.remove(id);
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
                Some(
                    TaskState::Assigned { node_id, attempt }
                    | TaskState::Running { node_id, attempt }
                    | TaskState::Disconnected {
                        node_id, attempt, ..
                    },
                ),
            ) = (e, before)
            {
                self.send_cancel(node_id, *id, Some(attempt), &c.reason);
            }
        }
        relevant
    }

    /// Whether the view has applied the node and task streams as far as
    /// they reached at start (before that, no task is judged).
    fn caught_up(&self) -> bool {
        self.targets
            .iter()
            .all(|(s, t)| self.applied.get(s).copied().unwrap_or(0) >= *t)
    }

    /// Settles the tasks live on nodes the view has offline, so that they
    /// wait for their node or are placed again, and reconnects the waiting
    /// runs of nodes that are back. Most are settled when a node goes or
    /// comes; this also finds those assigned to a node while it went (by
    /// another instance, or an assignment seen after the offline event) and
    /// the runs whose wait is over.
    fn settle_stranded(&mut self) {
        if !self.caught_up() {
            return;
        }
        let (mut offline, mut online) = (HashSet::new(), HashSet::new());
        for e in self.cluster.nodes.values() {
            if e.node.liveness() == crate::node::Liveness::Offline {
                offline.insert(e.node.id);
            } else {
                online.insert(e.node.id);
            }
        }
        self.settle_tasks_on(|n| offline.contains(&n), |n| online.contains(&n));
    }

    /// For every task live on a node `gone` says is gone: a disconnect (the
    /// run may be heard from again within its grace), or a loss when it has
    /// no grace or its grace is over, so that it is placed anew. For every
    /// disconnected task of a node `back` says is back: a reconnect. In the
    /// background and many at once: placements go on meanwhile.
    fn settle_tasks_on(&mut self, gone: impl Fn(NodeId) -> bool, back: impl Fn(NodeId) -> bool) {
        let now = now_millis();
        let mut items = Vec::new();
        for (id, t) in &self.cluster.tasks {
            let Some(node) = t.task.state.live_node() else {
                continue;
            };
            let command = match &t.task.state {
                TaskState::Disconnected { .. } if back(node) => {
                    TaskCommand::Reconnect { node_id: node }
                }
                TaskState::Disconnected { lost_at, .. } if gone(node) && now >= *lost_at => {
                    TaskCommand::Lose {
                        node_id: node,
                        reason: format!("node {node} went offline and was not back in time"),
                    }
                }
                TaskState::Assigned { .. } | TaskState::Running { .. } if gone(node) => {
                    let grace =
                        i64::try_from(self.grace_of(&t.task.spec).as_millis()).unwrap_or(i64::MAX);
                    if grace > 0 {
                        TaskCommand::Disconnect {
                            node_id: node,
                            lost_at: now.saturating_add(grace),
                        }
                    } else {
                        TaskCommand::Lose {
                            node_id: node,
                            reason: format!("node {node} went offline"),
                        }
                    }
                }
                TaskState::Cancelling { .. } if gone(node) => TaskCommand::Lose {
                    node_id: node,
                    reason: format!("node {node} went offline"),
                },
                _ => continue,
            };
            if !self.losing.insert(*id) {
                continue;
            }
            items.push(Against {
                id: *id,
                state: Some(t.task.clone()),
                seq: t.seq,
                command,
                meta: EventMeta::new("scheduler"),
            });
        }
        if items.is_empty() {
            return;
        }
        let ids: Vec<TaskId> = items.iter().map(|a| a.id).collect();
        let commands: Vec<&'static str> = items.iter().map(|a| a.command.name()).collect();
        let (tasks, news) = (self.tasks.clone(), self.pass_news.clone());
        tokio::spawn(async move {
            tasks
                .execute_each(items, PLACEMENTS_IN_FLIGHT, Retries(2), |i, result| {
                    let (Some(id), Some(command)) = (ids.get(i), commands.get(i)) else {
                        return;
                    };
                    match result {
                        // `disconnect` (the run waits for its node), `reconnect`
                        // (it goes on) or `lose` (it is placed again).
                        Ok(done) if !done.events.is_empty() => {
                            info!(task_id = %id, command, "task of a node that went or came settled")
                        }
                        // Changed meanwhile: no longer live on that node.
                        Ok(_) | Err(ExecuteError::Rejected(_) | ExecuteError::Conflict) => {}
                        Err(e) => warn!(task_id = %id, error = %e, command, "cannot settle the task of a node"),
                    }
                })
                .await;
            let _ = news.send(PassNews::Lost(ids));
        });
    }

    async fn stop_lost_runs(&mut self, node: NodeId) {
        for (id, attempt) in self.lost.remove(&node).unwrap_or_default() {
            // Placed on this very node again: that run is the live one.
            let live_here = self
                .cluster
                .tasks
                .get(&id)
                .is_some_and(|t| t.task.state.live_node() == Some(node));
            if !live_here {
                info!(task_id = %id, node_id = %node, "stopping a run lost with its node");
                // That attempt only: the next one may be placed on this
                // very node before the cancel goes out.
                self.send_cancel(
                    node,
                    id,
                    Some(attempt),
                    "the run was lost with its node and placed elsewhere",
                );
            }
        }
    }

    /// Sends again the runs of tasks assigned long ago and not started.
    fn resend_overdue(&mut self) {
        let mut runs = Vec::new();
        for (id, since) in self.unstarted.iter_mut() {
            if since.elapsed() < RESEND_AFTER {
                continue;
            }
            if let Some(t) = self.cluster.tasks.get(id) {
                if let TaskState::Assigned { node_id, .. } = t.task.state {
                    runs.push((node_id, t.task.clone()));
                    *since = std::time::Instant::now();
                }
            }
        }
        if !runs.is_empty() {
            info!(runs = runs.len(), "sending runs not started in time again");
        }
        for (node, task) in runs {
            self.send_run(node, &task);
        }
    }

    fn resend_unstarted(&self) {
        for (id, t) in &self.cluster.tasks {
            match &t.task.state {
                TaskState::Assigned { node_id, .. } => self.send_run(*node_id, &t.task),
                TaskState::Cancelling {
                    node_id, attempt, ..
                } => self.publish_cancel(*node_id, *id, Some(*attempt), "cancel requested"),
                _ => {}
            }
        }
    }
}

/// Follows a settings bucket (every key's last value, then changes) and
/// sends each key's record (`None`: deleted); binds again when the watch
/// ends, or when it has gone quiet while the bucket changed (a hub reload
/// can drop the watch's consumer without the client noticing for a while).
async fn watch_settings<R: serde::de::DeserializeOwned>(
    js: async_nats::jetstream::Context,
    bucket: &'static str,
    tx: mpsc::Sender<(String, Option<R>)>,
) {
    use futures::StreamExt;
    // The bucket's last sequence when the watch was last bound anew for
    // being behind it: if that message is gone (a compaction), a fresh watch
    // never reaches it, and is not behind for that.
    let mut rebound_at = 0;
    loop {
        let kv = js.get_key_value(bucket).await.ok();
        let watch = match &kv {
            Some(kv) => kv.watch_with_history(">").await.ok(),
            None => None,
        };
        if let (Some(kv), Some(mut entries)) = (kv, watch) {
            let mut seen = 0;
            loop {
                let entry = match tokio::time::timeout(WATCH_STALL_CHECK, entries.next()).await {
                    Ok(Some(Ok(entry))) => entry,
                    Ok(_) => break,
                    Err(_) => match kv.status().await {
                        Ok(s) if s.info.state.last_sequence > seen.max(rebound_at) => {
                            rebound_at = s.info.state.last_sequence;
                            warn!(bucket, "settings watch stalled; watching again");
                            break;
                        }
                        _ => continue,
                    },
                };
                seen = entry.revision;
                let record = match entry.operation {
                    async_nats::jetstream::kv::Operation::Put => {
                        match serde_json::from_slice::<R>(&entry.value) {
                            Ok(r) => Some(r),
                            Err(e) => {
                                warn!(bucket, key = %entry.key, error = %e, "unreadable settings ignored");
                                continue;
                            }
                        }
                    }
                    _ => None,
                };
                if tx.send((entry.key.clone(), record)).await.is_err() {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every project's quota in the `ud_quotas` bucket, asked again while the
/// hub is briefly away; none (and a warning) if it stays away.
async fn load_quotas(js: &async_nats::jetstream::Context) -> Quotas {
    use futures::StreamExt;
    let read = || async {
        let kv = js
            .get_key_value(streams::QUOTAS_BUCKET)
            .await
            .map_err(nats_err)?;
        let mut keys = kv.keys().await.map_err(nats_err)?;
        let mut quotas = Quotas::default();
        while let Some(k) = keys.next().await {
            let k = k.map_err(nats_err)?;
            if let Some(v) = kv.get(&k).await.map_err(nats_err)? {
                match serde_json::from_slice::<QuotaRecord>(&v) {
                    Ok(r) => quotas.set(&k, Some(Quota::from(&r))),
                    Err(e) => warn!(project = %k, error = %e, "unreadable quota ignored"),
                }
            }
        }
        Ok::<_, crate::edge::EdgeError>(quotas)
    };
    read.retry(
        backon::ConstantBuilder::default()
            .with_delay(Duration::from_millis(200))
            .with_max_times(50),
    )
    .await
    .unwrap_or_else(|e| {
        warn!(error = %e, "cannot read the quotas; placing without them until their watch has them");
        Quotas::default()
    })
}

/// Runs liveness and scheduling until the streams end.
pub async fn run(commands: TaskCommands, settings: ControllerSettings) {
    let (tx, mut rx) = mpsc::channel::<Update>(65_536);
    let js = commands.store().jetstream().clone();
    let tasks = commands.tasks().clone();
    let nodes = Repository::<Node>::new(commands.store().clone());
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
        let last = (|| async {
            let mut s = js.get_stream(stream).await.map_err(nats_err)?;
            Ok::<_, crate::edge::EdgeError>(s.info().await.map_err(nats_err)?.state.last_sequence)
        })
        .retry(
            backon::ConstantBuilder::default()
                .with_delay(Duration::from_millis(200))
                .with_max_times(50),
        )
        .await
        .ok();
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
    tokio::spawn(write_verdicts(tasks.clone(), verdicts_rx, unwritten_tx));
    let (dispatches, dispatches_rx) = mpsc::unbounded_channel();
    tokio::spawn(publish_dispatches(js.clone(), dispatches_rx));
    let (pass_news, mut news) = mpsc::unbounded_channel();
    let mut c = Controller {
        placing: HashMap::new(),
        passes: 0,
        pass_news,
        wanted: false,
        verdicts,
        unwritten,
        dispatches,
        tasks,
        nodes,
        settings,
        quotas: Quotas::default(),
        cluster: Cluster::default(),
        inflight: HashMap::new(),
        memory: Memory::default(),
        losing: HashSet::new(),
        ended: HashMap::new(),
        looking_up: HashSet::new(),
        targets,
        applied: HashMap::new(),
        lost: HashMap::new(),
        unstarted: HashMap::new(),
    };
    let (queue_tx, mut queue_rx) = mpsc::channel::<(String, Option<QueueRecord>)>(256);
    tokio::spawn(watch_settings(js.clone(), streams::QUEUES_BUCKET, queue_tx));
    // The quotas as stored, before the first pass: no task goes past one
    // not read yet. (The watch then follows every change.)
    c.quotas = load_quotas(&js).await;
    let (quota_tx, mut quota_rx) = mpsc::channel::<(String, Option<QuotaRecord>)>(256);
    tokio::spawn(watch_settings(js.clone(), streams::QUOTAS_BUCKET, quota_tx));
    let mut tick = tokio::time::interval(c.settings.check_interval);
    let mut resent = false;
    loop {
        tokio::select! {
            Some(n) = news.recv() => {
                c.on_pass_news(n);
                while let Ok(more) = news.try_recv() {
                    c.on_pass_news(more);
                }
            }
            Some((name, record)) = queue_rx.recv() => {
                let config = record.map(|r| QueueConfig {
                    priority: r.priority,
                    max_running: r.max_running,
                    lost_after_seconds: r.lost_after_seconds,
                });
                info!(queue = %name, ?config, "queue settings changed");
                c.settings.queues.set(&name, config);
                c.wanted = true;
            }
            Some((project, record)) = quota_rx.recv() => {
                let quota = record.as_ref().map(Quota::from);
                info!(project = %project, ?quota, "quota changed");
                c.quotas.set(&project, quota);
                // Tasks waiting for the quota are told anew.
                c.memory.waiting.retain(|_, kind| !kind.starts_with("quota "));
                c.wanted = true;
            }
            u = rx.recv() => {
                let Some(u) = u else { break };
                let mut relevant = c.on_update(&u).await;
                while let Ok(more) = rx.try_recv() {
                    relevant |= c.on_update(&more).await;
                }
                // Heartbeats alone change nothing to place; the tick looks anyway.
                if relevant {
                    c.wanted = true;
                }
            }
            _ = tick.tick() => {
                if !resent {
                    c.resend_unstarted();
                    resent = true;
                }
                let timeout = i64::try_from(c.settings.heartbeat_timeout.as_millis()).unwrap_or(i64::MAX);
                crate::edge::liveness::check(&c.nodes, &c.cluster, now_millis(), timeout).await;
                c.resend_overdue();
                c.settle_stranded();
                c.prune_ended();
                c.cluster.gpu_time.prune(now_millis());
                c.wanted = true;
            }
        }
        if c.wanted {
            c.schedule();
        }
    }
}
