//! What a node declares about itself.

use ud_schemas::spec::Gpu;
use ud_schemas::NodeResources;

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

fn disk_mb() -> u64 {
    disk_free_mb(std::path::Path::new("/")).unwrap_or(0)
}

/// Free space, in MiB, of the filesystem holding `path`.
pub fn disk_free_mb(path: &std::path::Path) -> Option<u64> {
    fs2::available_space(path).ok().map(|b| b / (1024 * 1024))
}

/// GPUs from `nvidia-smi`, none where it is absent.
pub fn gpus() -> Vec<Gpu> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,memory.total",
            "--format=csv,noheader,nounits",
        ])
        .output();
    let Ok(out) = out else { return vec![] };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (name, mem) = l.split_once(',')?;
            Some(Gpu {
                model: name.trim().to_owned(),
                memory_mb: mem.trim().parse().ok()?,
            })
        })
        .collect()
}

pub async fn detect(docker_version: Option<String>) -> NodeResources {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let wsl = std::fs::read_to_string("/proc/version")
        .is_ok_and(|v| v.to_lowercase().contains("microsoft"));
    NodeResources {
        cpu_millis: u32::try_from(cpus * 1000).unwrap_or(u32::MAX),
        memory_mb: meminfo_mb(),
        disk_mb: disk_mb(),
        gpus: tokio::task::spawn_blocking(gpus).await.unwrap_or_default(),
        os: std::env::consts::OS.to_owned(),
        wsl,
        docker_version,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    }
}

/// GPUs with their driver version, for the record of what a run used.
pub fn gpus_in_use() -> Vec<ud_schemas::events::GpuInUse> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name,driver_version", "--format=csv,noheader"])
        .output();
    let Ok(out) = out else { return vec![] };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (model, driver) = l.split_once(',')?;
            Some(ud_schemas::events::GpuInUse {
                model: model.trim().to_owned(),
                driver: driver.trim().to_owned(),
            })
        })
        .collect()
}
