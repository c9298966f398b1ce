//! What a node declares about itself: what it offers tasks, its own reserve
//! taken off.

use ud_schemas::events::GpuInUse;
use ud_schemas::spec::NetworkMode;
use ud_schemas::NodeResources;

use crate::gpus::Detected;

fn meminfo_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

/// Free space, in MiB, of the filesystem holding `path`.
pub fn disk_free_mb(path: &std::path::Path) -> Option<u64> {
    fs2::available_space(path).ok().map(|b| b / (1024 * 1024))
}

/// What the node keeps for itself and what it lets tasks do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Offer {
    /// CPU (thousandths of a core) and memory never offered to tasks.
    pub reserve_cpu_millis: u32,
    pub reserve_memory_mb: u64,
    /// Network modes its owner allows tasks besides `none`.
    pub networks: Vec<NetworkMode>,
}

/// What the node offers: the machine's CPUs, memory and disk less the
/// reserve, and the GPUs found (none when Docker cannot give them).
pub fn resources(
    docker_version: Option<String>,
    offer: &Offer,
    gpus: &Detected,
    cpus: usize,
    memory_mb: u64,
) -> NodeResources {
    let cpu_millis = u32::try_from(cpus * 1000).unwrap_or(u32::MAX);
    let mut networks = vec![NetworkMode::None];
    networks.extend(offer.networks.iter().filter(|n| **n != NetworkMode::None));
    networks.dedup();
    NodeResources {
        cpu_millis: cpu_millis.saturating_sub(offer.reserve_cpu_millis),
        memory_mb: memory_mb.saturating_sub(offer.reserve_memory_mb),
        disk_mb: disk_free_mb(std::path::Path::new("/")).unwrap_or(0),
        gpus: gpus.gpus.clone(),
        os: std::env::consts::OS.to_owned(),
        wsl: crate::gpus::is_wsl(),
        docker_version,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        gpu_driver: gpus.driver.clone(),
        cuda_version: gpus.cuda.clone(),
        networks,
    }
}

/// This machine's CPUs and memory.
pub fn machine() -> (usize, u64) {
    (
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        meminfo_mb(),
    )
}

/// The devices a run was given, as the record of what it used.
pub fn gpus_in_use(detected: &Detected, devices: &[String]) -> Vec<GpuInUse> {
    devices
        .iter()
        .map(|id| {
            let gpu = detected.gpus.iter().find(|g| &g.uuid == id);
            GpuInUse {
                model: gpu.map(|g| g.model.clone()).unwrap_or_default(),
                driver: detected.driver.clone().unwrap_or_default(),
                uuid: id.clone(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_kept_back_and_egress_is_offered_only_when_allowed() {
        let offer = Offer {
            reserve_cpu_millis: 1500,
            reserve_memory_mb: 4096,
            networks: vec![],
        };
        let r = resources(None, &offer, &Detected::default(), 8, 32768);
        assert_eq!((r.cpu_millis, r.memory_mb), (6500, 28672));
        assert_eq!(r.networks, vec![NetworkMode::None]);
        let open = Offer {
            networks: vec![NetworkMode::Egress],
            ..offer
        };
        let r = resources(None, &open, &Detected::default(), 1, 1024);
        assert_eq!(
            (r.cpu_millis, r.memory_mb),
            (0, 0),
            "a reserve larger than the machine offers nothing"
        );
        assert_eq!(r.networks, vec![NetworkMode::None, NetworkMode::Egress]);
    }
}
