//! GPUs by device: which of a node's devices a task gets, given what the
//! tasks already placed there hold. A device is held by one task, unless
//! every task holding it asked to share.

use std::borrow::Cow;
use std::collections::BTreeMap;

use ud_schemas::gpu::model_matches;
use ud_schemas::spec::Gpu;
use ud_schemas::{NodeResources, Resources};

use crate::node::Node;

/// How a device is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    Exclusive,
    /// By this many tasks that share.
    Shared(u32),
}

/// The devices the tasks on one node hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held {
    pub devices: BTreeMap<String, Hold>,
    /// GPUs taken by tasks that name no devices (placed before devices were
    /// recorded): they stand for that many of the node's free devices.
    pub unnamed: u64,
}

impl Held {
    /// A task holds `devices` (or, naming none, `count` GPUs).
    pub fn take(&mut self, devices: &[String], count: u32, shared: bool) {
        if devices.is_empty() {
            self.unnamed += u64::from(count);
            return;
        }
        for d in devices {
            let hold = match (self.devices.get(d), shared) {
                (Some(Hold::Shared(n)), true) => Hold::Shared(n + 1),
                (None, true) => Hold::Shared(1),
                _ => Hold::Exclusive,
            };
            self.devices.insert(d.clone(), hold);
        }
    }

    /// GPUs held, counting each device once.
    pub fn count(&self) -> u64 {
        self.devices.len() as u64 + self.unnamed
    }
}

/// Whether `a` (dotted numbers: `8.0`, `535.104.05`) is at least `b`.
pub fn version_at_least(a: &str, b: &str) -> bool {
    let parts = |v: &str| -> Vec<u64> {
        v.split('.')
            .map(|p| p.trim().parse().unwrap_or(0))
            .collect()
    };
    let (a, b) = (parts(a), parts(b));
    for i in 0..a.len().max(b.len()) {
        let (x, y) = (
            a.get(i).copied().unwrap_or(0),
            b.get(i).copied().unwrap_or(0),
        );
        if x != y {
            return x > y;
        }
    }
    true
}

/// Whether one device is what `req` asks of each GPU: its model family,
/// memory and compute capability.
pub fn suits(gpu: &Gpu, req: &Resources) -> bool {
    let model = req
        .gpu_model
        .as_deref()
        .is_none_or(|m| model_matches(m, &gpu.model, gpu.memory_mb));
    let memory = gpu.memory_mb >= req.gpu_memory_mb;
    let capability = match (&req.gpu_compute_capability, &gpu.compute_capability) {
        (None, _) => true,
        (Some(min), Some(has)) => version_at_least(has, min),
        (Some(_), None) => false,
    };
    model && memory && capability
}

/// Whether the node's driver is as new as `req` asks.
pub fn driver_suits(res: &NodeResources, req: &Resources) -> bool {
    match (&req.gpu_driver, &res.gpu_driver) {
        (None, _) => true,
        (Some(min), Some(has)) => version_at_least(has, min),
        (Some(_), None) => false,
    }
}

/// How many of the node's devices could ever serve `req` (empty node).
pub fn suitable(res: &NodeResources, req: &Resources) -> usize {
    if !driver_suits(res, req) {
        return 0;
    }
    res.gpus.iter().filter(|g| suits(g, req)).count()
}

/// The devices of `node` that `req` could get next to what `held` holds,
/// in the node's order: (rank, index, id), rank 0 for a device others share
/// (when `req` shares too), 1 for a free one. The id is the UUID, or the
/// position for GPUs an older agent registered without one. `None`: the
/// node's driver is too old (or its resources are not known).
fn usable<'a>(
    node: &'a Node,
    held: &'a Held,
    req: &'a Resources,
) -> Option<impl Iterator<Item = (u8, u32, Cow<'a, str>)> + 'a> {
    let res = node.resources.as_ref()?;
    if !driver_suits(res, req) {
        return None;
    }
    // A node's devices are mostly alike: judged once per kind.
    let mut last: Option<(&Gpu, bool)> = None;
    Some(res.gpus.iter().enumerate().filter_map(move |(i, g)| {
        let id: Cow<'a, str> = if g.uuid.is_empty() {
            Cow::Owned(i.to_string())
        } else {
            Cow::Borrowed(g.uuid.as_str())
        };
        let visible = node
            .visible_gpus
            .as_ref()
            .is_none_or(|v| v.iter().any(|v| *v == *id));
        let suited = match last {
            Some((l, ok))
                if l.model == g.model
                    && l.memory_mb == g.memory_mb
                    && l.compute_capability == g.compute_capability =>
            {
                ok
            }
            _ => {
                let ok = suits(g, req);
                last = Some((g, ok));
                ok
            }
        };
        if !visible || !suited {
            return None;
        }
        let rank = match held.devices.get(id.as_ref()) {
            None => 1,
            // A sharing task goes where others share first, keeping whole
            // devices free.
            Some(Hold::Shared(_)) if req.gpu_shared => 0,
            Some(_) => return None,
        };
        Some((rank, g.index, id))
    }))
}

/// How many devices `req` could get on `node` next to what `held` holds,
/// without choosing them (placement asks this of every node).
pub fn free_count(node: &Node, held: &Held, req: &Resources) -> usize {
    let Some(res) = node.resources.as_ref() else {
        return 0;
    };
    let unnamed = usize::try_from(held.unnamed).unwrap_or(usize::MAX);
    // Devices held are the node's own: at most the rest are wholly free,
    // which is all a task that does not share can get.
    let at_most = res
        .gpus
        .len()
        .saturating_sub(held.devices.len())
        .saturating_sub(unnamed);
    let plain = req.gpu_model.is_none()
        && req.gpu_memory_mb == 0
        && req.gpu_compute_capability.is_none()
        && node.visible_gpus.is_none();
    if !req.gpu_shared && (plain || at_most < usize::try_from(req.gpus).unwrap_or(usize::MAX)) {
        return if driver_suits(res, req) { at_most } else { 0 };
    }
    let Some(devices) = usable(node, held, req) else {
        return 0;
    };
    let (whole, shared) = devices.fold((0usize, 0usize), |(w, s), (rank, ..)| {
        if rank == 1 {
            (w + 1, s)
        } else {
            (w, s + 1)
        }
    });
    // Tasks that name no devices took some of the free ones.
    whole.saturating_sub(unnamed) + shared
}

/// The devices `req` gets on `node` next to what `held` holds, lowest index
/// first; `None` when too few are free. A task asking for no GPU gets none.
pub fn allocate(node: &Node, held: &Held, req: &Resources) -> Option<Vec<String>> {
    if req.gpus == 0 {
        return Some(Vec::new());
    }
    let mut free: Vec<(u8, u32, String)> = usable(node, held, req)?
        .map(|(rank, index, id)| (rank, index, id.into_owned()))
        .collect();
    free.sort();
    // Tasks that name no devices took some of the free ones.
    let unnamed = usize::try_from(held.unnamed).unwrap_or(usize::MAX);
    let wholly_free = free.iter().filter(|(rank, ..)| *rank == 1).count();
    let skip_free = unnamed.min(wholly_free);
    let mut skipped = 0;
    let mut out = Vec::with_capacity(req.gpus as usize);
    for (rank, _, id) in free {
        if rank == 1 && skipped < skip_free {
            skipped += 1;
            continue;
        }
        out.push(id);
        if out.len() == req.gpus as usize {
            return Some(out);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use ud_schemas::{NodeId, SchedulingMode};

    use super::*;

    fn gpu(i: u32, model: &str, mem: u64, cc: &str) -> Gpu {
        Gpu {
            model: model.into(),
            memory_mb: mem,
            index: i,
            uuid: format!("GPU-{i}"),
            compute_capability: Some(cc.into()),
            mig_profile: None,
            pci_bus_id: None,
        }
    }

    fn node(gpus: Vec<Gpu>) -> Node {
        Node {
            id: NodeId::new(),
            name: "n".into(),
            labels: BTreeMap::new(),
            resources: Some(NodeResources {
                cpu_millis: 64_000,
                memory_mb: 512 * 1024,
                gpus,
                gpu_driver: Some("535.104.05".into()),
                ..Default::default()
            }),
            last_seen: Some(1),
            offline_after: None,
            revoked: false,
            low_disk: false,
            scheduling: SchedulingMode::Active,
            disk_free_mb: None,
            visible_gpus: None,
        }
    }

    fn req(gpus: u32) -> Resources {
        Resources {
            cpu_millis: 1000,
            memory_mb: 1,
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

    #[test]
    fn devices_are_given_by_id_never_twice_and_by_what_each_must_be() {
        let n = node(vec![
            gpu(0, "NVIDIA A100-SXM4-80GB", 81920, "8.0"),
            gpu(1, "NVIDIA A100-SXM4-40GB", 40960, "8.0"),
            gpu(2, "Tesla V100-SXM2-16GB", 16384, "7.0"),
        ]);
        let mut held = Held::default();
        let first = allocate(&n, &held, &req(1));
        assert_eq!(first, Some(vec!["GPU-0".to_owned()]));
        held.take(&["GPU-0".into()], 1, false);
        assert_eq!(allocate(&n, &held, &req(1)), Some(vec!["GPU-1".to_owned()]));
        // By family, memory and compute capability.
        let a100_80 = Resources {
            gpu_model: Some("a100-80gb".into()),
            ..req(1)
        };
        assert_eq!(
            allocate(&n, &held, &a100_80),
            None,
            "its only device is held"
        );
        let big = Resources {
            gpu_memory_mb: 30_000,
            ..req(1)
        };
        assert_eq!(allocate(&n, &held, &big), Some(vec!["GPU-1".to_owned()]));
        let ampere = Resources {
            gpu_compute_capability: Some("8.0".into()),
            ..req(2)
        };
        assert_eq!(allocate(&n, &held, &ampere), None, "one Ampere left");
        let newer_driver = Resources {
            gpu_driver: Some("550".into()),
            ..req(1)
        };
        assert_eq!(allocate(&n, &Held::default(), &newer_driver), None);
        assert_eq!(
            suitable(
                n.resources.as_ref().unwrap_or_else(|| unreachable!()),
                &ampere
            ),
            2
        );
    }

    #[test]
    fn sharing_tasks_share_with_each_other_only_and_unseen_devices_are_not_given() {
        let mut n = node(vec![
            gpu(0, "NVIDIA GeForce RTX 4090", 24564, "8.9"),
            gpu(1, "NVIDIA GeForce RTX 4090", 24564, "8.9"),
        ]);
        let shared = Resources {
            gpu_shared: true,
            ..req(1)
        };
        let mut held = Held::default();
        held.take(&["GPU-0".into()], 1, true);
        // A sharing task joins the shared device; an exclusive one takes the other.
        assert_eq!(allocate(&n, &held, &shared), Some(vec!["GPU-0".to_owned()]));
        assert_eq!(allocate(&n, &held, &req(1)), Some(vec!["GPU-1".to_owned()]));
        assert_eq!(allocate(&n, &held, &req(2)), None);
        // A device the node no longer sees is not given.
        n.visible_gpus = Some(vec!["GPU-0".into()]);
        assert_eq!(allocate(&n, &Held::default(), &req(2)), None);
        assert_eq!(
            allocate(&n, &Held::default(), &req(1)),
            Some(vec!["GPU-0".to_owned()])
        );
    }

    #[test]
    fn versions_compare_by_number_and_old_registrations_get_positions() {
        assert!(version_at_least("535.104.05", "535.104"));
        assert!(version_at_least("8.9", "8.0"));
        assert!(!version_at_least("7.5", "8.0"));
        assert!(version_at_least("12.10", "12.2"));
        let mut old = node(vec![gpu(0, "A100", 1, "8.0"), gpu(0, "A100", 1, "8.0")]);
        if let Some(r) = old.resources.as_mut() {
            for g in &mut r.gpus {
                g.uuid.clear();
            }
        }
        assert_eq!(
            allocate(&old, &Held::default(), &req(2)),
            Some(vec!["0".to_owned(), "1".to_owned()])
        );
        let mut held = Held::default();
        held.take(&[], 1, false);
        assert_eq!(allocate(&old, &held, &req(1)), Some(vec!["1".to_owned()]));
    }

    proptest! {
        #[test]
        fn no_device_is_given_twice_and_every_one_is_free_again_when_its_tasks_end(
            sizes in proptest::collection::vec((1u32..4, any::<bool>()), 1..40),
            gpus in 1usize..9,
            ends in proptest::collection::vec(any::<bool>(), 40),
        ) {
            let n = node((0..gpus as u32).map(|i| gpu(i, "NVIDIA H100 80GB HBM3", 81559, "9.0")).collect());
            let mut live: Vec<(Vec<String>, bool)> = Vec::new();
            for (i, (want, shared)) in sizes.iter().enumerate() {
                let mut held = Held::default();
                for (devices, s) in &live {
                    held.take(devices, devices.len() as u32, *s);
                }
                let r = Resources { gpu_shared: *shared, ..req(*want) };
                // Placement's count agrees with the choice made afterwards.
                let fits = free_count(&n, &held, &r) >= *want as usize;
                prop_assert_eq!(fits, allocate(&n, &held, &r).is_some());
                if let Some(got) = allocate(&n, &held, &r) {
                    prop_assert_eq!(got.len(), *want as usize);
                    let mut distinct = got.clone();
                    distinct.sort();
                    distinct.dedup();
                    prop_assert_eq!(distinct.len(), got.len(), "a device twice in one task");
                    for d in &got {
                        for (other, s) in &live {
                            // Held by another task only when both share.
                            prop_assert!(!other.contains(d) || (*shared && *s));
                        }
                    }
                    live.push((got, *shared));
                }
                // Some tasks end, their devices free again.
                if ends[i % ends.len()] && !live.is_empty() {
                    live.remove(0);
                }
            }
            live.clear();
            let everything = Resources { ..req(gpus as u32) };
            prop_assert_eq!(allocate(&n, &Held::default(), &everything).map(|d| d.len()), Some(gpus));
        }
    }
}
