//! `ud-bench schedule`: the scheduler's placement and queue policy (pure
//! functions) over 1,000 nodes of mixed shapes: placements per second with
//! pack and spread, beside plain first fit measured in the same run, and the
//! cost of ordering a large queue fairly.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use anyhow::Result;
use ud_core::edge::scheduler::{fair_order, fit, place, Placement, Queued, Usage};
use ud_core::node::Node;
use ud_schemas::spec::Gpu;
use ud_schemas::{NodeId, NodeResources, Resources, TaskId};

use crate::stats::line;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Tasks placed per measurement.
    #[arg(long, default_value_t = 20_000)]
    tasks: usize,
}

/// A small deterministic generator, so that runs compare.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
}

fn nodes(n: usize, rng: &mut Lcg) -> Vec<Node> {
    (0..n)
        .map(|i| {
            let gpus = [0, 0, 0, 1, 2, 4, 8][rng.next(7) as usize];
            let (model, cc) = if rng.next(2) == 0 {
                ("NVIDIA A100-SXM4-80GB", "8.0")
            } else {
                ("NVIDIA H100 80GB HBM3", "9.0")
            };
            Node {
                id: NodeId::new(),
                name: format!("n{i}"),
                labels: BTreeMap::from([("zone".to_owned(), format!("z{}", rng.next(4)))]),
                resources: Some(NodeResources {
                    cpu_millis: [8_000, 16_000, 32_000, 64_000][rng.next(4) as usize],
                    memory_mb: [32_768, 65_536, 262_144][rng.next(3) as usize],
                    gpus: (0..gpus)
                        .map(|g| Gpu {
                            model: model.into(),
                            memory_mb: 81_920,
                            index: g,
                            uuid: format!("GPU-{i:04}-{g}"),
                            compute_capability: Some(cc.into()),
                            mig_profile: None,
                            pci_bus_id: None,
                        })
                        .collect(),
                    ..Default::default()
                }),
                last_seen: Some(ud_schemas::now_millis()),
                offline_after: None,
                revoked: false,
                low_disk: false,
                scheduling: ud_schemas::SchedulingMode::Active,
                disk_free_mb: Some(1_000_000),
                visible_gpus: None,
            }
        })
        .collect()
}

fn requests(n: usize, rng: &mut Lcg) -> Vec<Resources> {
    (0..n)
        .map(|_| {
            let gpus = [0, 0, 0, 1, 2][rng.next(5) as usize];
            let mut labels = BTreeMap::new();
            if rng.next(4) == 0 {
                labels.insert("zone".to_owned(), format!("z{}", rng.next(4)));
            }
            let mut preferred = BTreeMap::new();
            if rng.next(3) == 0 {
                preferred.insert("zone".to_owned(), format!("z{}", rng.next(4)));
            }
            Resources {
                cpu_millis: [500, 1_000, 2_000, 4_000][rng.next(4) as usize],
                memory_mb: [512, 2_048, 8_192][rng.next(3) as usize],
                gpus,
                gpu_model: (gpus > 0 && rng.next(2) == 0).then(|| "A100".to_owned()),
                labels,
                preferred_labels: preferred,
                disk_mb: 0,
                gpu_memory_mb: 0,
                gpu_compute_capability: None,
                gpu_driver: None,
                gpu_shared: false,
                network: Default::default(),
                preferred_nodes: Vec::new(),
            }
        })
        .collect()
}

fn add(usage: &mut HashMap<NodeId, Usage>, node: NodeId, r: &Resources, devices: &[String]) {
    let u = usage.entry(node).or_default();
    u.cpu_millis += u64::from(r.cpu_millis);
    u.memory_mb += r.memory_mb;
    u.gpus.take(devices, r.gpus, r.gpu_shared);
    u.disk_mb += r.disk_mb;
}

/// Places every request in turn on a cluster that starts empty, each GPU
/// task on its own devices; (placed, per second).
fn run(
    nodes: &[Node],
    reqs: &[Resources],
    choose: impl Fn(&[Node], &HashMap<NodeId, Usage>, &Resources) -> Option<(NodeId, Vec<String>)>,
) -> (usize, f64) {
    let mut usage = HashMap::new();
    let t = Instant::now();
    let mut placed = 0;
    for r in reqs {
        if let Some((n, devices)) = choose(nodes, &usage, r) {
            add(&mut usage, n, r, &devices);
            placed += 1;
        }
    }
    (placed, reqs.len() as f64 / t.elapsed().as_secs_f64())
}

pub fn run_bench(a: Args) -> Result<()> {
    println!(
        "UniDesk scheduler benchmark: {} nodes of mixed shapes, {} requests",
        a.nodes, a.tasks
    );
    let mut rng = Lcg(7);
    let nodes = nodes(a.nodes, &mut rng);
    let reqs = requests(a.tasks, &mut rng);
    // Baseline: the first node by id with room (no preferences, no scoring).
    let mut sorted = nodes.clone();
    sorted.sort_by_key(|n| n.id);
    let none = Usage::default();
    let (placed, base) = run(&sorted, &reqs, |ns, u, r| {
        ns.iter()
            .find_map(|n| fit(n, u.get(&n.id).unwrap_or(&none), r).map(|d| (n.id, d)))
    });
    line(
        "baseline first fit: placement decisions per second",
        base,
        "/s",
        None,
    );
    line("baseline first fit: tasks placed", placed as f64, "", None);
    for (name, how) in [("pack", Placement::Pack), ("spread", Placement::Spread)] {
        let (placed, rate) = run(&nodes, &reqs, |ns, u, r| place(ns.iter(), u, r, how));
        line(
            &format!("{name}: placement decisions per second (target 5,000)"),
            rate,
            "/s",
            Some((base, "first fit")),
        );
        line(&format!("{name}: tasks placed"), placed as f64, "", None);
    }
    // Ordering a large queue: 10,000 pending tasks of 50 projects at 3 priorities.
    let projects: Vec<String> = (0..50).map(|i| format!("p{i}")).collect();
    let queued: Vec<Queued<'_>> = (0..10_000u64)
        .map(|i| Queued {
            id: TaskId::new(),
            queue_priority: 0,
            priority: (rng.next(3) as i32) - 1,
            project: projects[rng.next(50) as usize].as_str(),
            seq: i,
            live: rng.next(4) as usize,
            served: rng.next(1000),
        })
        .collect();
    let t = Instant::now();
    let rounds = 20;
    for _ in 0..rounds {
        std::hint::black_box(fair_order(&queued));
    }
    line(
        "fair order of 10,000 pending tasks",
        t.elapsed().as_secs_f64() * 1000.0 / f64::from(rounds),
        "ms",
        None,
    );
    Ok(())
}
