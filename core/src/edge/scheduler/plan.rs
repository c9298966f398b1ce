//! One scheduling pass as a pure function: given the view of nodes and
//! tasks, what is being placed already and the queue settings, which tasks
//! go to which node and what the others are told about why they wait.

use std::collections::HashMap;

use ud_schemas::spec::AfterWhen;
use ud_schemas::{Millis, NodeId, Resources, TaskId, TaskStatus};

use super::quota::{self, Held, Quotas};
use super::{add, explain, fair_order, place, Placement, Queued, Queues, Unplaced, Usage};
use crate::edge::view::Cluster;
use crate::node::Node;
use crate::task::{TaskCommand, TaskState};

/// What passes remember from one to the next.
#[derive(Clone, Debug, Default)]
pub struct Memory {
    /// When each project was last given a node (see [`fair_order`]).
    pub served: HashMap<String, u64>,
    pub serve_counter: u64,
    /// Why each unplaced pending task waits, as last told (its kind: what
    /// keeps it waiting, without counts, so that it is told on change only).
    pub waiting: HashMap<TaskId, String>,
}

/// Tasks being assigned and not seen back yet: their node and GPU devices.
pub type InFlight = HashMap<TaskId, (NodeId, Vec<String>)>;

/// What a pass decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Tasks to assign, each to its node with its GPU devices, in the order
    /// they were served.
    pub assign: Vec<(TaskId, NodeId, Vec<String>)>,
    /// What unplaced tasks are told (`Wait` or `Unschedulable`).
    pub verdicts: Vec<(TaskId, TaskCommand)>,
    /// Tasks pending ones run after whose end is to be looked up: the view
    /// no longer holds them and `Rules::ended` does not know them yet.
    pub look_up: Vec<TaskId>,
}

/// The settings a pass reads.
pub struct Rules<'a> {
    pub placement: Placement,
    pub queues: &'a Queues,
    /// Compute quotas per project.
    pub quotas: &'a Quotas,
    /// Whether the view holds every event stored before the controller
    /// started: until then, no task is judged unplaceable.
    pub caught_up: bool,
    pub now: Millis,
    /// How tasks that others run after ended, as far as known (a task the
    /// view no longer holds has ended; one in neither is being looked up).
    pub ended: &'a HashMap<TaskId, TaskStatus>,
}

/// Whether a pending task's `after` tasks let it run.
#[derive(Debug, PartialEq, Eq)]
enum Ready {
    Yes,
    /// Not yet: the first task it still waits for (one the view no longer
    /// holds has ended, and how is to be looked up).
    Waits(TaskId),
    /// Never: one ended as it may not.
    Never(String),
}

fn ready(cluster: &Cluster, rules: &Rules<'_>, t: &crate::task::Task) -> Ready {
    for a in &t.spec.after {
        if cluster.tasks.contains_key(&a.task) {
            return Ready::Waits(a.task);
        }
        match (rules.ended.get(&a.task), a.when) {
            (None, _) => return Ready::Waits(a.task),
            (Some(TaskStatus::Succeeded), _) | (Some(_), AfterWhen::Any) => {}
            (Some(other), AfterWhen::Success) => {
                return Ready::Never(format!(
                    "task {} it runs after ended {other}, not succeeded",
                    a.task
                ))
            }
        }
    }
    Ready::Yes
}

/// What the tasks live on each node (and those being placed there) take.
pub fn usage(cluster: &Cluster, inflight: &InFlight) -> HashMap<NodeId, Usage> {
    let mut usage = HashMap::new();
    for t in cluster.tasks.values() {
        if let Some(node) = t.task.state.live_node() {
            add(&mut usage, node, &t.task.spec, &t.task.gpus);
        }
    }
    for (task, (node, devices)) in inflight {
        if let Some(t) = cluster.tasks.get(task) {
            if t.task.state == TaskState::Pending {
                add(&mut usage, *node, &t.task.spec, devices);
            }
        }
    }
    usage
}

/// Decides one pass. `inflight` holds tasks this instance is assigning and
/// has not seen back yet: they are not placed again and count against their
/// node and queue.
pub fn plan(
    cluster: &Cluster,
    inflight: &InFlight,
    rules: &Rules<'_>,
    memory: &mut Memory,
) -> Plan {
    let mut out = Plan::default();
    let mut live: HashMap<&str, usize> = HashMap::new();
    let mut queue_live: HashMap<String, u32> = HashMap::new();
    let mut held: HashMap<&str, Held> = HashMap::new();
    for t in cluster
        .tasks
        .values()
        .filter(|t| t.task.state.live_node().is_some())
    {
        *live.entry(t.task.project.as_str()).or_default() += 1;
        *queue_live.entry(t.task.spec.queue.clone()).or_default() += 1;
        held.entry(t.task.project.as_str())
            .or_default()
            .add(&t.task.spec.resources);
    }
    // Being placed, not yet seen back: they count against their queue and
    // quota too.
    for id in inflight.keys() {
        if let Some(t) = cluster
            .tasks
            .get(id)
            .filter(|t| t.task.state == TaskState::Pending)
        {
            *queue_live.entry(t.task.spec.queue.clone()).or_default() += 1;
            held.entry(t.task.project.as_str())
                .or_default()
                .add(&t.task.spec.resources);
        }
    }
    let (mut verdicts, mut look_up) = (Vec::new(), Vec::new());
    let queued: Vec<Queued<'_>> = cluster
        .tasks
        .iter()
        .filter(|(id, t)| t.task.state == TaskState::Pending && !inflight.contains_key(id))
        // A retry waits out its backoff (the periodic tick picks it up).
        .filter(|(_, t)| t.task.not_before.is_none_or(|at| at <= rules.now))
        // Tasks that run after others wait for them (or fail, if they cannot).
        .filter(|(id, t)| match ready(cluster, rules, &t.task) {
            Ready::Yes => true,
            _ if !rules.caught_up => false,
            Ready::Waits(first) => {
                if !cluster.tasks.contains_key(&first) {
                    look_up.push(first);
                }
                let kind = format!("after {first}");
                if memory.waiting.get(*id) != Some(&kind) {
                    let reason = format!("waiting for task {first} to end");
                    memory.waiting.insert(**id, kind.clone());
                    verdicts.push((**id, TaskCommand::Wait { reason, kind }));
                }
                false
            }
            Ready::Never(reason) => {
                if memory.waiting.get(*id).map(String::as_str) != Some("never") {
                    memory.waiting.insert(**id, "never".into());
                    verdicts.push((**id, TaskCommand::Unschedulable { reason }));
                }
                false
            }
        })
        .map(|(id, t)| {
            let project = t.task.project.as_str();
            Queued {
                id: *id,
                queue_priority: rules.queues.get(&t.task.spec.queue).priority,
                priority: t.task.spec.priority,
                project,
                seq: t.queued_at,
                live: live.get(project).copied().unwrap_or(0),
                served: memory.served.get(project).copied().unwrap_or(0),
            }
        })
        .collect();
    out.verdicts = verdicts;
    look_up.sort_unstable();
    look_up.dedup();
    out.look_up = look_up;
    if queued.is_empty() {
        return out;
    }
    let mut usage = usage(cluster, inflight);
    let online: Vec<&Node> = cluster.online().map(|e| &e.node).collect();
    let mut explained: HashMap<Resources, Unplaced> = HashMap::new();
    for id in fair_order(&queued) {
        let Some(entry) = cluster.tasks.get(&id) else {
            continue;
        };
        let spec = &entry.task.spec;
        // A queue at its limit places nothing more until one of its tasks ends.
        if let Some(limit) = rules.queues.get(&spec.queue).max_running {
            if queue_live.get(&spec.queue).copied().unwrap_or(0) >= limit {
                let kind = format!("queue {} at its limit", spec.queue);
                if rules.caught_up && memory.waiting.get(&id) != Some(&kind) {
                    let reason = format!("queue {} runs its limit of {limit} tasks", spec.queue);
                    memory.waiting.insert(id, kind.clone());
                    out.verdicts.push((id, TaskCommand::Wait { reason, kind }));
                }
                continue;
            }
        }
        // A project at its quota places nothing more that would pass it.
        let project = entry.task.project.as_str();
        if let Some(q) = rules.quotas.get(project) {
            // What the project holds is known once the view caught up.
            if !rules.caught_up {
                continue;
            }
            let used = cluster.gpu_time.used(project, rules.now);
            let now_held = held.get(project).copied().unwrap_or_default();
            if let Some((kind, reason)) = quota::over(project, q, &now_held, &spec.resources, used)
            {
                if memory.waiting.get(&id) != Some(&kind) {
                    memory.waiting.insert(id, kind.clone());
                    out.verdicts.push((id, TaskCommand::Wait { reason, kind }));
                }
                continue;
            }
        }
        let Some((node, devices)) = place(
            online.iter().copied(),
            &usage,
            &spec.resources,
            rules.placement,
        ) else {
            if rules.caught_up {
                let why = explained
                    .entry(spec.resources.clone())
                    .or_insert_with(|| {
                        explain(
                            cluster.nodes.values().map(|e| &e.node),
                            &usage,
                            &spec.resources,
                        )
                    })
                    .clone();
                let (kind, command) = match why {
                    Unplaced::Never(reason) => {
                        ("never".to_owned(), TaskCommand::Unschedulable { reason })
                    }
                    Unplaced::Waits { reason, kind } => {
                        (kind.clone(), TaskCommand::Wait { reason, kind })
                    }
                };
                if memory.waiting.get(&id) != Some(&kind) {
                    memory.waiting.insert(id, kind);
                    out.verdicts.push((id, command));
                }
            }
            continue;
        };
        add(&mut usage, node, spec, &devices);
        *queue_live.entry(spec.queue.clone()).or_default() += 1;
        held.entry(project).or_default().add(&spec.resources);
        memory.serve_counter += 1;
        memory
            .served
            .insert(entry.task.project.to_string(), memory.serve_counter);
        out.assign.push((id, node, devices));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ud_schemas::{NodeResources, ProjectId};

    use super::*;
    use crate::edge::view::{NodeEntry, TaskEntry};
    use crate::task::Task;

    fn node(cpus: u32) -> Node {
        Node {
            id: NodeId::new(),
            name: "n".into(),
            labels: BTreeMap::new(),
            resources: Some(NodeResources {
                cpu_millis: cpus * 1000,
                memory_mb: 64 * 1024,
                ..Default::default()
            }),
            last_seen: Some(1),
            offline_after: None,
            revoked: false,
            low_disk: false,
            scheduling: ud_schemas::SchedulingMode::Active,
            disk_free_mb: Some(1_000_000),
            visible_gpus: None,
        }
    }

    fn task(project: &str, cpus: u32, queue: &str) -> Task {
        let mut spec = crate::task::tests::spec();
        spec.resources.cpu_millis = cpus * 1000;
        spec.queue = queue.into();
        Task {
            id: TaskId::new(),
            project: ProjectId::parse(project).unwrap_or_else(|e| unreachable!("{e}")),
            spec,
            state: TaskState::Pending,
            attempts: 0,
            not_before: None,
            gpus: Vec::new(),
            last_node: None,
            version: 1,
        }
    }

    fn cluster(nodes: &[Node], tasks: &[Task]) -> Cluster {
        let mut c = Cluster::default();
        for n in nodes {
            c.nodes.insert(
                n.id,
                NodeEntry {
                    node: n.clone(),
                    seq: 1,
                },
            );
        }
        for (i, t) in tasks.iter().enumerate() {
            c.tasks.insert(
                t.id,
                TaskEntry {
                    task: t.clone(),
                    seq: i as u64 + 1,
                    queued_at: i as u64 + 1,
                },
            );
        }
        c
    }

    fn rules(queues: &Queues) -> Rules<'_> {
        Rules {
            placement: Placement::Pack,
            queues,
            caught_up: true,
            now: 10,
            // Leaked: a test's few bytes, for references that live as long as `queues`.
            quotas: Box::leak(Box::default()),
            ended: Box::leak(Box::default()),
        }
    }

    #[test]
    fn a_task_runs_after_the_tasks_it_names_and_fails_if_one_cannot_end_as_asked() {
        let n = node(8);
        let first = task("a", 1, "default");
        let mut after = task("a", 1, "default");
        after.spec.after = vec![ud_schemas::spec::After {
            task: first.id,
            when: AfterWhen::Success,
        }];
        let mut after_any = task("a", 1, "default");
        after_any.spec.after = vec![ud_schemas::spec::After {
            task: first.id,
            when: AfterWhen::Any,
        }];
        let queues = Queues::default();
        let mut memory = Memory::default();
        // While the first is in the view (unfinished), both wait, told once.
        let view = cluster(
            std::slice::from_ref(&n),
            &[first.clone(), after.clone(), after_any.clone()],
        );
        let p = plan(&view, &HashMap::new(), &rules(&queues), &mut memory);
        assert_eq!(
            p.assign.iter().map(|a| a.0).collect::<Vec<_>>(),
            vec![first.id]
        );
        assert_eq!(p.verdicts.len(), 2, "{:?}", p.verdicts);
        assert!(p
            .verdicts
            .iter()
            .all(|(_, c)| matches!(c, TaskCommand::Wait { reason, .. } if reason.contains(&first.id.to_string()))));
        let again = plan(&view, &HashMap::new(), &rules(&queues), &mut memory);
        assert!(again.verdicts.is_empty());
        // Gone from the view, its end not known yet: looked up, still waiting.
        let view = cluster(
            std::slice::from_ref(&n),
            &[after.clone(), after_any.clone()],
        );
        let p = plan(&view, &HashMap::new(), &rules(&queues), &mut memory);
        assert!(p.assign.is_empty());
        assert_eq!(p.look_up, vec![first.id]);
        // It failed: the one after it fails too, the one after any end runs.
        let ended = HashMap::from([(first.id, TaskStatus::Failed)]);
        let r = Rules {
            ended: &ended,
            ..rules(&queues)
        };
        let p = plan(&view, &HashMap::new(), &r, &mut memory);
        assert!(p.look_up.is_empty());
        assert_eq!(
            p.assign.iter().map(|a| a.0).collect::<Vec<_>>(),
            vec![after_any.id]
        );
        assert!(matches!(
            &p.verdicts[..],
            [(id, TaskCommand::Unschedulable { reason })] if *id == after.id && reason.contains("failed")
        ));
        // It succeeded: both run.
        let ended = HashMap::from([(first.id, TaskStatus::Succeeded)]);
        let r = Rules {
            ended: &ended,
            ..rules(&queues)
        };
        let p = plan(&view, &HashMap::new(), &r, &mut Memory::default());
        assert_eq!(p.assign.len(), 2);
    }

    #[test]
    fn tasks_that_fit_are_assigned_and_the_rest_told_why_once() {
        let n = node(4);
        let tasks = [
            task("a", 2, "default"),
            task("a", 2, "default"),
            task("a", 2, "default"),
        ];
        let view = cluster(std::slice::from_ref(&n), &tasks);
        let queues = Queues::default();
        let mut memory = Memory::default();
        let p = plan(&view, &HashMap::new(), &rules(&queues), &mut memory);
        assert_eq!(
            p.assign,
            vec![(tasks[0].id, n.id, vec![]), (tasks[1].id, n.id, vec![])]
        );
        assert_eq!(p.verdicts.len(), 1);
        assert_eq!(p.verdicts[0].0, tasks[2].id);
        assert!(matches!(p.verdicts[0].1, TaskCommand::Wait { .. }));
        // The two placed are in flight now: the third still waits, and is
        // not told again.
        let inflight = p
            .assign
            .iter()
            .map(|(t, n, d)| (*t, (*n, d.clone())))
            .collect();
        let again = plan(&view, &inflight, &rules(&queues), &mut memory);
        assert_eq!(again, Plan::default());
    }

    #[test]
    fn a_task_no_node_could_ever_run_is_unschedulable() {
        let view = cluster(&[node(2)], &[task("a", 8, "default")]);
        let queues = Queues::default();
        let p = plan(
            &view,
            &HashMap::new(),
            &rules(&queues),
            &mut Memory::default(),
        );
        assert!(p.assign.is_empty());
        assert!(
            matches!(&p.verdicts[..], [(_, TaskCommand::Unschedulable { reason })] if reason.contains("CPUs"))
        );
    }

    #[test]
    fn a_queue_at_its_limit_places_nothing_more() {
        let tasks = [task("a", 1, "gpu"), task("a", 1, "gpu")];
        let view = cluster(&[node(8)], &tasks);
        let queues = Queues::parse(r#"{"queues": {"gpu": {"max_running": 1}}}"#)
            .unwrap_or_else(|e| unreachable!("{e}"));
        let p = plan(
            &view,
            &HashMap::new(),
            &rules(&queues),
            &mut Memory::default(),
        );
        assert_eq!(p.assign.len(), 1);
        assert!(
            matches!(&p.verdicts[..], [(id, TaskCommand::Wait { reason, .. })] if *id == tasks[1].id && reason.contains("limit of 1"))
        );
    }

    #[test]
    fn a_project_at_its_quota_waits_while_others_run_and_runs_when_it_frees() {
        let mut running = task("lab", 2, "default");
        let n = node(8);
        running.state = TaskState::Running {
            node_id: n.id,
            attempt: 1,
        };
        let (lab, other) = (task("lab", 2, "default"), task("other", 2, "default"));
        let mut view = cluster(&[n], &[running.clone(), lab.clone(), other.clone()]);
        let queues = Queues::default();
        let mut quotas = super::quota::Quotas::default();
        quotas.set(
            "lab",
            Some(super::quota::Quota {
                max_cpu_millis: Some(3000),
                ..Default::default()
            }),
        );
        let r = Rules {
            quotas: &quotas,
            ..rules(&queues)
        };
        let mut memory = Memory::default();
        let p = plan(&view, &HashMap::new(), &r, &mut memory);
        assert_eq!(p.assign.iter().map(|a| a.0).collect::<Vec<_>>(), [other.id]);
        assert!(
            matches!(&p.verdicts[..], [(id, TaskCommand::Wait { reason, .. })]
                if *id == lab.id && reason.contains("holds 2 of its quota of 3 CPUs")),
            "{:?}",
            p.verdicts
        );
        // Told once, not again at every pass.
        view.tasks.remove(&other.id);
        let again = plan(&view, &HashMap::new(), &r, &mut memory);
        assert_eq!(again, Plan::default());
        // The running task ends: the waiting one goes.
        view.tasks.remove(&running.id);
        let p = plan(&view, &HashMap::new(), &r, &mut memory);
        assert_eq!(p.assign.iter().map(|a| a.0).collect::<Vec<_>>(), [lab.id]);
    }

    #[test]
    fn nothing_is_judged_before_the_view_caught_up_and_retries_wait_out_their_backoff() {
        let mut later = task("a", 1, "default");
        later.not_before = Some(20);
        let impossible = task("a", 64, "default");
        let view = cluster(&[node(2)], &[later, impossible]);
        let queues = Queues::default();
        let mut r = rules(&queues);
        r.caught_up = false;
        let p = plan(&view, &HashMap::new(), &r, &mut Memory::default());
        assert_eq!(p, Plan::default());
        r.now = 20;
        let p = plan(&view, &HashMap::new(), &r, &mut Memory::default());
        assert_eq!(p.assign.len(), 1);
    }

    #[test]
    fn projects_take_turns_on_a_full_node() {
        let a: Vec<Task> = (0..4).map(|_| task("a", 1, "default")).collect();
        let b = task("b", 1, "default");
        let mut all = a.clone();
        all.push(b.clone());
        let view = cluster(&[node(2)], &all);
        let queues = Queues::default();
        let p = plan(
            &view,
            &HashMap::new(),
            &rules(&queues),
            &mut Memory::default(),
        );
        let placed: Vec<TaskId> = p.assign.iter().map(|(t, ..)| *t).collect();
        assert_eq!(placed, vec![a[0].id, b.id]);
    }
}
