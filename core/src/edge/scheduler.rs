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
use crate::task::{TaskCommand, TaskState};

/// What the tasks placed on a node take from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub cpu_millis: u64,
    pub memory_mb: u64,
    pub gpus: u64,
}

/// Does `req` fit on `node` next to `used`?
pub fn fits(node: &Node, used: Usage, req: &Resources) -> bool {
    let Some(res) = &node.resources else { return false };
    if node.low_disk || node.scheduling != "active" {
        return false;
    }
    let labels_ok = req.labels.iter().all(|(k, v)| node.labels.get(k) == Some(v));
    let gpu_model_ok = match &req.gpu_model {
        Some(model) => req.gpus == 0 || res.gpus.iter().filter(|g| &g.model == model).count() as u64 >= used.gpus + u64::from(req.gpus),
        None => true,
    };
    labels_ok
        && gpu_model_ok
        && used.cpu_millis + u64::from(req.cpu_millis) <= u64::from(res.cpu_millis)
        && used.memory_mb + req.memory_mb <= res.memory_mb
        && used.gpus + u64::from(req.gpus) <= res.gpus.len() as u64
}

/// The first online node (by id, for stable choices) the request fits on.
pub fn first_fit<'a>(nodes: impl Iterator<Item = &'a Node>, usage: &HashMap<NodeId, Usage>, req: &Resources) -> Option<NodeId> {
    let mut candidates: Vec<&Node> = nodes.collect();
    candidates.sort_by_key(|n| n.id);
    candidates
        .into_iter()
        .find(|n| fits(n, usage.get(&n.id).copied().unwrap_or_default(), req))
        .map(|n| n.id)
}

fn add(usage: &mut HashMap<NodeId, Usage>, node: NodeId, spec: &TaskSpec) {
    let u = usage.entry(node).or_default();
    u.cpu_millis += u64::from(spec.resources.cpu_millis);
    u.memory_mb += spec.resources.memory_mb;
    u.gpus += u64::from(spec.resources.gpus);
}

#[derive(Clone, Debug)]
pub struct ControllerSettings {
    /// A node silent this long is offline.
    pub heartbeat_timeout: Duration,
    /// How often liveness is checked.
    pub check_interval: Duration,
    /// Seconds between a cancel's graceful signal and the kill.
    pub cancel_grace_seconds: u32,
}

struct Controller {
    commands: TaskCommands,
    settings: ControllerSettings,
    cluster: Cluster,
    /// Assigned by this instance, not yet seen back in the stream.
    inflight: HashMap<TaskId, NodeId>,
}

async fn publish_dispatch(commands: &TaskCommands, node: NodeId, task: TaskId, kind: &str, msg_id: String, payload: Vec<u8>) {
    let js = commands.store().jetstream();
    let subject = edge::dispatch_subject(&node, &task, kind);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", msg_id.as_str());
    headers.insert("Content-Type", "application/cbor");
    match js.publish_with_headers(subject, headers, Bytes::from(payload)).await {
        Ok(ack) => {
            if let Err(e) = ack.await {
                warn!(task_id = %task, node_id = %node, error = %e, "dispatch not stored");
            }
        }
        Err(e) => warn!(task_id = %task, node_id = %node, error = %e, "dispatch not sent"),
    }
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

    async fn send_run(&self, node: NodeId, task: TaskId, attempt: u32, spec: &TaskSpec) {
        let run = DispatchRun { at: now_millis(), task_id: task, attempt, spec: spec.clone() };
        match dispatch::to_cbor(&run) {
            Ok(bytes) => publish_dispatch(&self.commands, node, task, "run", format!("run-{task}-{attempt}"), bytes).await,
            Err(e) => warn!(task_id = %task, error = %e, "cannot encode dispatch"),
        }
    }

    async fn send_cancel(&self, node: NodeId, task: TaskId, reason: &str) {
        let cancel = DispatchCancel { at: now_millis(), task_id: task, reason: reason.to_owned(), grace_seconds: self.settings.cancel_grace_seconds };
        if let Ok(bytes) = dispatch::to_cbor(&cancel) {
            publish_dispatch(&self.commands, node, task, "cancel", format!("cancel-{task}-{}", now_millis()), bytes).await;
        }
    }

    async fn schedule(&mut self) {
        let mut pending: Vec<(u64, TaskId)> = self
            .cluster
            .tasks
            .iter()
            .filter(|(id, t)| t.task.state == TaskState::Pending && !self.inflight.contains_key(id))
            .map(|(id, t)| (t.seq, *id))
            .collect();
        if pending.is_empty() {
            return;
        }
        pending.sort();
        let mut usage = self.usage();
        let online: Vec<Node> = self.cluster.online().map(|e| e.node.clone()).collect();
        for (_, id) in pending {
            let Some(entry) = self.cluster.tasks.get(&id) else { continue };
            let spec = entry.task.spec.clone();
            let Some(node) = first_fit(online.iter(), &usage, &spec.resources) else { continue };
            match self.commands.execute(id, TaskCommand::Assign { node_id: node }, "scheduler", |_| true).await {
                Ok(_) => {
                    let attempt = entry.task.attempts + 1;
                    info!(task_id = %id, node_id = %node, attempt, "task assigned");
                    add(&mut usage, node, &spec);
                    self.inflight.insert(id, node);
                    self.send_run(node, id, attempt, &spec).await;
                }
                Err(CommandError::Conflict | CommandError::Rejected(_)) => {}
                Err(e) => warn!(task_id = %id, error = %e, "cannot assign"),
            }
        }
    }

    async fn on_update(&mut self, u: &Update) {
        let before = match &u.envelope.event {
            ud_schemas::Event::Task(id, _) => self.cluster.tasks.get(id).map(|t| t.task.state.clone()),
            _ => None,
        };
        self.cluster.apply(u);
        if let ud_schemas::Event::Task(id, e) = &u.envelope.event {
            if !matches!(self.cluster.tasks.get(id).map(|t| &t.task.state), Some(TaskState::Pending)) {
                self.inflight.remove(id);
            }
            // Dispatches lost in a crash between assignment and send are sent again on start.
            if !u.live {
                return;
            }
            if let (ud_schemas::TaskEvent::CancelRequested(c), Some(TaskState::Assigned { node_id, .. } | TaskState::Running { node_id, .. })) = (e, before) {
                self.send_cancel(node_id, *id, &c.reason).await;
            }
        }
    }

    async fn resend_unstarted(&self) {
        for (id, t) in &self.cluster.tasks {
            match &t.task.state {
                TaskState::Assigned { node_id, attempt } => self.send_run(*node_id, *id, *attempt, &t.task.spec).await,
                TaskState::Cancelling { node_id, .. } => self.send_cancel(*node_id, *id, "cancel requested").await,
                _ => {}
            }
        }
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
    let mut c = Controller { commands, settings, cluster: Cluster::default(), inflight: HashMap::new() };
    let mut tick = tokio::time::interval(c.settings.check_interval);
    let mut resent = false;
    loop {
        tokio::select! {
            u = rx.recv() => {
                let Some(u) = u else { break };
                c.on_update(&u).await;
                while let Ok(more) = rx.try_recv() {
                    c.on_update(&more).await;
                }
                c.schedule().await;
            }
            _ = tick.tick() => {
                if !resent {
                    c.resend_unstarted().await;
                    resent = true;
                }
                let timeout = i64::try_from(c.settings.heartbeat_timeout.as_millis()).unwrap_or(i64::MAX);
                super::liveness::check(c.commands.store(), &c.cluster, now_millis(), timeout).await;
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
                gpus: (0..gpus).map(|_| Gpu { model: "A100".into(), memory_mb: 1 }).collect(),
                ..Default::default()
            }),
            last_seen: Some(1),
            offline_after: None,
            revoked: false,
            low_disk: false,
            scheduling: "active".into(),
        }
    }

    fn req(cpu: u32, mem: u64, gpus: u32) -> Resources {
        Resources { cpu_millis: cpu, memory_mb: mem, gpus, gpu_model: None, labels: BTreeMap::new() }
    }

    #[test]
    fn labels_models_and_capacity_decide() {
        let small = node(1000, 1024, 0, "a");
        let gpu = node(8000, 65536, 2, "b");
        let nodes = [small.clone(), gpu.clone()];
        let none = HashMap::new();
        assert_eq!(first_fit(nodes.iter(), &none, &req(4000, 1024, 0)), Some(gpu.id));
        let mut zoned = req(500, 512, 0);
        zoned.labels.insert("zone".into(), "a".into());
        assert_eq!(first_fit(nodes.iter(), &none, &zoned), Some(small.id));
        let mut model = req(500, 512, 1);
        model.gpu_model = Some("H100".into());
        assert_eq!(first_fit(nodes.iter(), &none, &model), None);
        let full = HashMap::from([(gpu.id, Usage { cpu_millis: 8000, memory_mb: 0, gpus: 0 })]);
        assert_eq!(first_fit(nodes.iter(), &full, &req(4000, 1024, 0)), None);
    }

    proptest! {
        /// Placing tasks one after another never over-commits a node.
        #[test]
        fn never_over_commits(reqs in proptest::collection::vec((1u32..4000, 1u64..8000, 0u32..3), 1..60)) {
            let nodes = [node(8000, 16000, 2, "a"), node(4000, 8000, 0, "a"), node(16000, 32000, 4, "b")];
            let mut usage: HashMap<NodeId, Usage> = HashMap::new();
            for (cpu, mem, gpus) in reqs {
                let r = req(cpu, mem, gpus);
                if let Some(id) = first_fit(nodes.iter(), &usage, &r) {
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
