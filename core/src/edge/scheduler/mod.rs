//! Scheduling policy as pure functions: whether a task fits a node, which
//! node it goes to (pack or spread, preferred labels), the order pending
//! tasks are served in (priorities, turns between projects), queue settings,
//! and why a task that cannot be placed waits. The controller that runs it
//! against the streams is in [`controller`].

use std::collections::HashMap;

use ud_schemas::spec::NetworkMode;
use ud_schemas::{NodeId, Resources, SchedulingMode, TaskId, TaskSpec};

use crate::node::Node;

mod controller;
pub mod gpus;
pub mod plan;
pub mod quota;

pub use controller::{run, ControllerSettings};

/// What the tasks placed on a node take from it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub cpu_millis: u64,
    pub memory_mb: u64,
    /// The GPU devices held.
    pub gpus: gpus::Held,
    /// Disk the node's live tasks asked for; counted against the free disk
    /// it last reported (conservative: their real use is in that figure too).
    pub disk_mb: u64,
}

/// Whether the node's owner lets tasks have `network`.
fn network_allowed(node: &Node, network: NetworkMode) -> bool {
    network == NetworkMode::None
        || node
            .resources
            .as_ref()
            .is_some_and(|r| r.networks.contains(&network))
}

/// The GPU devices `req` gets on `node` next to `used`, when it fits there
/// at all (`Some(vec![])` for a task that asks for no GPU).
pub fn fit(node: &Node, used: &Usage, req: &Resources) -> Option<Vec<String>> {
    if !fits(node, used, req) {
        return None;
    }
    gpus::allocate(node, &used.gpus, req)
}

/// Whether the node takes tasks and has room for `req`'s CPUs, memory,
/// disk, labels and network (GPUs apart).
fn room(node: &Node, used: &Usage, req: &Resources) -> bool {
    let Some(res) = node.resources.as_ref() else {
        return false;
    };
    if node.low_disk || node.scheduling != SchedulingMode::Active {
        return false;
    }
    let labels_ok = req
        .labels
        .iter()
        .all(|(k, v)| node.labels.get(k) == Some(v));
    // Free disk as the last heartbeat said, less what the node's live tasks asked for.
    let disk_ok = req.disk_mb == 0
        || node
            .disk_free_mb
            .is_some_and(|free| used.disk_mb + req.disk_mb <= free);
    labels_ok
        && disk_ok
        && network_allowed(node, req.network)
        && used.cpu_millis + u64::from(req.cpu_millis) <= u64::from(res.cpu_millis)
        && used.memory_mb + req.memory_mb <= res.memory_mb
}

/// Does `req` fit on `node` next to `used`? (As [`fit`], without choosing
/// devices.)
pub fn fits(node: &Node, used: &Usage, req: &Resources) -> bool {
    room(node, used, req)
        && (req.gpus == 0
            || gpus::free_count(node, &used.gpus, req)
                >= usize::try_from(req.gpus).unwrap_or(usize::MAX))
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

/// The node `req` goes to, with the GPU devices it gets there: among the
/// nodes it fits on, one it prefers by id (it holds what the task starts
/// from), then the one carrying the most of its preferred labels, then
/// the fullest (pack) or emptiest (spread) by CPU after placing it, then the
/// lowest id (stable choices).
pub fn place<'a>(
    nodes: impl Iterator<Item = &'a Node>,
    usage: &HashMap<NodeId, Usage>,
    req: &Resources,
    strategy: Placement,
) -> Option<(NodeId, Vec<String>)> {
    let none = Usage::default();
    let used = |n: &Node| usage.get(&n.id).unwrap_or(&none);
    let best = nodes.filter(|n| fits(n, used(n), req)).max_by_key(|n| {
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
        let holds = req.preferred_nodes.contains(&n.id);
        (holds, preferred, fill, std::cmp::Reverse(n.id))
    })?;
    // Devices are chosen on the chosen node only.
    gpus::allocate(best, &used(best).gpus, req).map(|devices| (best.id, devices))
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
    /// How long a run of the queue stays `disconnected` before its task is
    /// lost, unless the task says (none: the platform's default).
    #[serde(default)]
    pub lost_after_seconds: Option<u64>,
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

pub use ud_schemas::api::QueueRecord;

impl Queues {
    pub fn parse(text: &str) -> Result<Self, super::EdgeError> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            queues: std::collections::BTreeMap<String, QueueConfig>,
        }
        let f: File = serde_json::from_str(text).map_err(|e| super::EdgeError::Settings {
            file: "queues file".into(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            file: f.queues,
            set: Default::default(),
        })
    }

    pub fn load(path: &std::path::Path) -> Result<Self, super::EdgeError> {
        let text = std::fs::read_to_string(path).map_err(|e| super::EdgeError::Settings {
            file: path.display().to_string(),
            reason: e.to_string(),
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
    if (gpus::suitable(res, req) as u64) < u64::from(req.gpus) {
        return Some("GPUs");
    }
    if !network_allowed(node, req.network) {
        return Some("network");
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
        } else if n.scheduling != SchedulingMode::Active {
            n.scheduling.as_str()
        } else if n.low_disk {
            "low on disk"
        } else if fits(n, usage.get(&n.id).unwrap_or(&Usage::default()), req) {
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

/// A task of `spec` holding `devices` on `node` takes from it.
pub(super) fn add(
    usage: &mut HashMap<NodeId, Usage>,
    node: NodeId,
    spec: &TaskSpec,
    devices: &[String],
) {
    let u = usage.entry(node).or_default();
    u.cpu_millis += u64::from(spec.resources.cpu_millis);
    u.memory_mb += spec.resources.memory_mb;
    u.gpus
        .take(devices, spec.resources.gpus, spec.resources.gpu_shared);
    u.disk_mb += spec.resources.disk_mb;
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
                    .map(|i| Gpu {
                        model: "NVIDIA A100-SXM4-80GB".into(),
                        memory_mb: 81920,
                        index: i as u32,
                        uuid: format!("GPU-{i}"),
                        compute_capability: Some("8.0".into()),
                        mig_profile: None,
                        pci_bus_id: None,
                    })
                    .collect(),
                ..Default::default()
            }),
            last_seen: Some(1),
            offline_after: None,
            revoked: false,
            low_disk: false,
            scheduling: SchedulingMode::Active,
            disk_free_mb: Some(1_000_000),
            visible_gpus: None,
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
            gpu_memory_mb: 0,
            gpu_compute_capability: None,
            gpu_driver: None,
            gpu_shared: false,
            network: Default::default(),
            preferred_nodes: Vec::new(),
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
                lost_after_seconds: None,
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
        cordoned.scheduling = SchedulingMode::Cordoned;
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
        assert!(fits(&n, &Usage::default(), &r));
        // What a task placed since the last heartbeat asked for counts too.
        assert!(!fits(
            &n,
            &Usage {
                disk_mb: 6_000,
                ..Default::default()
            },
            &r
        ));
        n.disk_free_mb = None;
        assert!(
            !fits(&n, &Usage::default(), &r),
            "unknown free disk does not fit a disk request"
        );
        assert!(
            fits(&n, &Usage::default(), &req(1000, 1, 0)),
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
            place(nodes.iter(), &usage, &req(1000, 1, 0), Placement::Pack).map(|p| p.0),
            Some(b.id)
        );
        assert_eq!(
            place(nodes.iter(), &usage, &req(1000, 1, 0), Placement::Spread).map(|p| p.0),
            Some(a.id)
        );
        // A preferred label outweighs both, while that node has room.
        let mut prefers_a = req(1000, 1, 0);
        prefers_a.preferred_labels.insert("zone".into(), "a".into());
        assert_eq!(
            place(nodes.iter(), &usage, &prefers_a, Placement::Pack).map(|p| p.0),
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
            place(nodes.iter(), &full_a, &prefers_a, Placement::Pack).map(|p| p.0),
            Some(b.id)
        );
        // The node holding what the task starts from comes first of all.
        let mut holds_b = prefers_a.clone();
        holds_b.preferred_nodes = vec![b.id];
        assert_eq!(
            place(nodes.iter(), &usage, &holds_b, Placement::Spread).map(|p| p.0),
            Some(b.id)
        );
        let full_b = HashMap::from([(
            b.id,
            Usage {
                cpu_millis: 8000,
                ..Default::default()
            },
        )]);
        assert_eq!(
            place(nodes.iter(), &full_b, &holds_b, Placement::Pack).map(|p| p.0),
            Some(a.id)
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
            place(nodes.iter(), &none, &req(4000, 1024, 0), Placement::Pack).map(|p| p.0),
            Some(gpu.id)
        );
        let mut zoned = req(500, 512, 0);
        zoned.labels.insert("zone".into(), "a".into());
        assert_eq!(
            place(nodes.iter(), &none, &zoned, Placement::Pack).map(|p| p.0),
            Some(small.id)
        );
        let mut model = req(500, 512, 1);
        model.gpu_model = Some("H100".into());
        assert_eq!(
            place(nodes.iter(), &none, &model, Placement::Pack).map(|p| p.0),
            None
        );
        let full = HashMap::from([(
            gpu.id,
            Usage {
                cpu_millis: 8000,
                ..Default::default()
            },
        )]);
        assert_eq!(
            place(nodes.iter(), &full, &req(4000, 1024, 0), Placement::Pack).map(|p| p.0),
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
                if let Some((id, devices)) = place(nodes.iter(), &usage, &r, strategy) {
                    prop_assert_eq!(devices.len(), gpus as usize);
                    let u = usage.entry(id).or_default();
                    u.cpu_millis += u64::from(cpu);
                    u.memory_mb += mem;
                    for d in &devices {
                        prop_assert!(!u.gpus.devices.contains_key(d), "{} given twice", d);
                    }
                    u.gpus.take(&devices, gpus, false);
                }
            }
            for n in &nodes {
                let u = usage.get(&n.id).cloned().unwrap_or_default();
                let res = n.resources.as_ref().unwrap_or_else(|| unreachable!());
                prop_assert!(u.cpu_millis <= u64::from(res.cpu_millis));
                prop_assert!(u.memory_mb <= res.memory_mb);
                prop_assert!(u.gpus.count() <= res.gpus.len() as u64);
            }
        }
    }
}
