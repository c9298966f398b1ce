//! The node's GPUs, as NVML (the NVIDIA Management Library, loaded at run
//! time) or, where it cannot be loaded, `nvidia-smi` reports them: each
//! device by UUID with its model, memory, compute capability and PCI bus,
//! MIG instances in place of a GPU in MIG mode, the driver and CUDA
//! versions. The parsers are pure and tested with recorded outputs.

use ud_schemas::spec::Gpu;

/// Where NVML lives on WSL2 (a CUDA stub elsewhere on the path can shadow it).
const WSL_NVML: &str = "/usr/lib/wsl/lib/libnvidia-ml.so.1";

/// What the node found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Detected {
    /// Devices a container can be given: whole GPUs, and the MIG instances
    /// of a GPU in MIG mode (instead of that GPU).
    pub gpus: Vec<Gpu>,
    pub driver: Option<String>,
    pub cuda: Option<String>,
    /// `nvml`, `nvidia-smi` or `none`.
    pub source: &'static str,
    /// Why no GPU was found where one may be (a driver that does not answer).
    pub problem: Option<String>,
}

/// One line of `nvidia-smi --query-gpu=` (see [`QUERY`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub memory_mb: u64,
    pub driver: Option<String>,
    pub compute_capability: Option<String>,
    pub mig: bool,
    pub pci_bus_id: Option<String>,
}

/// The fields asked of `nvidia-smi`, in the order [`parse_query`] reads them.
pub const QUERY: &str =
    "index,uuid,name,memory.total,driver_version,compute_cap,mig.mode.current,pci.bus_id";
/// The same without `compute_cap`, for drivers older than R510 that refuse it.
pub const QUERY_OLD: &str =
    "index,uuid,name,memory.total,driver_version,mig.mode.current,pci.bus_id";

/// A value `nvidia-smi` could not give (`[N/A]`, `[Not Supported]`).
fn known(v: &str) -> Option<String> {
    let v = v.trim();
    (!v.is_empty() && !v.starts_with('[') && v != "N/A").then(|| v.to_owned())
}

/// Reads `--query-gpu=<QUERY or QUERY_OLD> --format=csv,noheader,nounits`.
pub fn parse_query(text: &str, with_compute_cap: bool) -> Vec<Row> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            let (cc, rest) = if with_compute_cap {
                (f.get(5).and_then(|v| known(v)), f.get(6..)?)
            } else {
                (None, f.get(5..)?)
            };
            Some(Row {
                index: f.first()?.parse().ok()?,
                uuid: known(f.get(1)?)?,
                name: known(f.get(2)?)?,
                memory_mb: f.get(3)?.parse().ok()?,
                driver: f.get(4).and_then(|v| known(v)),
                compute_capability: cc,
                mig: rest
                    .first()
                    .is_some_and(|m| m.eq_ignore_ascii_case("enabled")),
                pci_bus_id: rest.get(1).and_then(|v| known(v)),
            })
        })
        .collect()
}

/// One MIG instance from `nvidia-smi -L`: its parent's index, profile, UUID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigInstance {
    pub parent: u32,
    pub profile: String,
    pub uuid: String,
}

/// Reads the MIG instances `nvidia-smi -L` lists under each GPU.
pub fn parse_list(text: &str) -> Vec<MigInstance> {
    let mut parent = None;
    let mut out = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("GPU ") {
            parent = rest.split(':').next().and_then(|i| i.trim().parse().ok());
        } else if let (Some(rest), Some(p)) = (t.strip_prefix("MIG "), parent) {
            let profile = rest.split_whitespace().next().unwrap_or_default();
            let uuid = t
                .split("(UUID: ")
                .nth(1)
                .and_then(|u| u.strip_suffix(')'))
                .unwrap_or_default();
            if !profile.is_empty() && uuid.starts_with("MIG-") {
                out.push(MigInstance {
                    parent: p,
                    profile: profile.to_owned(),
                    uuid: uuid.to_owned(),
                });
            }
        }
    }
    out
}

/// The CUDA version from `nvidia-smi`'s banner (`CUDA Version: 12.2`, or
/// `CUDA UMD Version: 13.3` from R610 on).
pub fn parse_cuda(banner: &str) -> Option<String> {
    let at = banner
        .find("CUDA Version:")
        .map(|i| i + "CUDA Version:".len())
        .or_else(|| {
            banner
                .find("CUDA UMD Version:")
                .map(|i| i + "CUDA UMD Version:".len())
        })?;
    let v = banner[at..].split_whitespace().next()?;
    known(v).filter(|v| v != "ERR!")
}

/// The memory of a MIG profile such as `1g.10gb` or `1c.3g.40gb`, in MiB.
fn profile_memory_mb(profile: &str) -> u64 {
    profile
        .rsplit('.')
        .next()
        .and_then(|m| m.strip_suffix("gb"))
        .and_then(|g| g.parse::<u64>().ok())
        .map_or(0, |g| g * 1024)
}

/// The devices a container can be given: each GPU, or, for a GPU in MIG
/// mode, its instances.
pub fn devices(rows: &[Row], migs: &[MigInstance]) -> Vec<Gpu> {
    let mut out = Vec::new();
    for r in rows {
        let gpu = Gpu {
            model: r.name.clone(),
            memory_mb: r.memory_mb,
            index: r.index,
            uuid: r.uuid.clone(),
            compute_capability: r.compute_capability.clone(),
            mig_profile: None,
            pci_bus_id: r.pci_bus_id.clone(),
        };
        let instances: Vec<&MigInstance> = migs.iter().filter(|m| m.parent == r.index).collect();
        if r.mig && !instances.is_empty() {
            out.extend(instances.into_iter().map(|m| Gpu {
                model: format!("{} MIG {}", r.name, m.profile),
                memory_mb: profile_memory_mb(&m.profile),
                uuid: m.uuid.clone(),
                mig_profile: Some(m.profile.clone()),
                ..gpu.clone()
            }));
        } else if !r.mig {
            out.push(gpu);
        }
        // A GPU in MIG mode with no instance yet offers nothing.
    }
    out
}

/// Whether this Linux is WSL2 (Docker Desktop on Windows).
pub fn is_wsl() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.to_lowercase();
    release.contains("microsoft")
        || release.contains("wsl")
        || std::path::Path::new("/dev/dxg").exists()
}

/// Finds the GPUs: NVML first (the WSL2 library where there is one), then
/// `nvidia-smi` (`smi`, a path or a name on the PATH).
pub fn detect(smi: &str) -> Detected {
    match nvml(is_wsl()) {
        Ok(d) => return d,
        Err(e) => tracing::debug!(error = %e, "NVML not loaded; asking nvidia-smi"),
    }
    from_smi(smi)
}

fn nvml(wsl: bool) -> Result<Detected, nvml_wrapper::error::NvmlError> {
    use nvml_wrapper::Nvml;
    let nvml = if wsl && std::path::Path::new(WSL_NVML).exists() {
        Nvml::builder()
            .lib_path(std::ffi::OsStr::new(WSL_NVML))
            .init()?
    } else {
        Nvml::init()?
    };
    let mut rows = Vec::new();
    let mut migs = Vec::new();
    for i in 0..nvml.device_count()? {
        let d = nvml.device_by_index(i)?;
        let cc = d
            .cuda_compute_capability()
            .ok()
            .map(|c| format!("{}.{}", c.major, c.minor));
        let mig = d.mig_mode().is_ok_and(|m| m.current == 1);
        if mig {
            // The slots are the most there can be: the empty ones are NotFound.
            for slot in 0..d.mig_device_count().unwrap_or(0) {
                if let Ok(m) = d.mig_device_by_index(slot) {
                    let memory = m.memory_info().map_or(0, |i| i.total / (1024 * 1024));
                    migs.push((
                        MigInstance {
                            parent: i,
                            profile: format!("{}gb", memory.div_ceil(1024)),
                            uuid: m.uuid().unwrap_or_default(),
                        },
                        memory,
                    ));
                }
            }
        }
        rows.push(Row {
            index: i,
            uuid: d.uuid()?,
            name: d.name()?,
            memory_mb: d.memory_info()?.total / (1024 * 1024),
            driver: None,
            compute_capability: cc,
            mig,
            pci_bus_id: d.pci_info().ok().map(|p| p.bus_id),
        });
    }
    let driver = nvml.sys_driver_version().ok();
    let cuda = nvml.sys_cuda_driver_version().ok().map(|v| {
        format!(
            "{}.{}",
            nvml_wrapper::cuda_driver_version_major(v),
            nvml_wrapper::cuda_driver_version_minor(v)
        )
    });
    let instances: Vec<MigInstance> = migs.iter().map(|(m, _)| m.clone()).collect();
    let mut gpus = devices(&rows, &instances);
    for g in &mut gpus {
        if let Some((_, mem)) = migs.iter().find(|(m, _)| m.uuid == g.uuid) {
            g.memory_mb = *mem;
        }
    }
    Ok(Detected {
        gpus,
        driver,
        cuda,
        source: "nvml",
        problem: None,
    })
}

fn run(smi: &str, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(smi)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(text)
    } else {
        Err(text.lines().next().unwrap_or("failed").trim().to_owned())
    }
}

/// The GPUs as `nvidia-smi` lists them.
pub fn from_smi(smi: &str) -> Detected {
    let format = "--format=csv,noheader,nounits";
    let (query, with_cc) = match run(smi, &[&format!("--query-gpu={QUERY}"), format]) {
        Ok(text) => (Ok(text), true),
        // Drivers before R510 do not know compute_cap.
        Err(e) if e.contains("compute_cap") => (
            run(smi, &[&format!("--query-gpu={QUERY_OLD}"), format]),
            false,
        ),
        Err(e) => (Err(e), true),
    };
    let text = match query {
        Ok(t) => t,
        Err(e) => {
            let missing = e.contains("No such file") || e.contains("not found");
            return Detected {
                source: "none",
                problem: (!missing).then_some(e),
                ..Default::default()
            };
        }
    };
    let rows = parse_query(&text, with_cc);
    let migs = run(smi, &["-L"])
        .map(|t| parse_list(&t))
        .unwrap_or_default();
    let cuda = run(smi, &[]).ok().and_then(|t| parse_cuda(&t));
    Detected {
        driver: rows.iter().find_map(|r| r.driver.clone()),
        gpus: devices(&rows, &migs),
        cuda,
        source: "nvidia-smi",
        problem: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    macro_rules! fixture {
        ($name:literal) => {
            include_str!(concat!("../fixtures/gpu/", $name))
        };
    }

    #[test]
    fn a_four_gpu_server_is_read_by_device() {
        let rows = parse_query(fixture!("a100-sxm4-80gb-x4.query-gpu.csv"), true);
        let gpus = devices(
            &rows,
            &parse_list(fixture!("a100-sxm4-80gb-x4.nvidia-smi-L.txt")),
        );
        assert_eq!(gpus.len(), 4);
        assert_eq!(gpus[0].uuid, "GPU-513536b6-7d19-9063-b049-1e69664bb298");
        assert_eq!(gpus[0].model, "NVIDIA A100-SXM4-80GB");
        assert_eq!(gpus[0].memory_mb, 81920);
        assert_eq!(gpus[0].compute_capability.as_deref(), Some("8.0"));
        assert_eq!(gpus[3].index, 3);
        assert_eq!(gpus[3].pci_bus_id.as_deref(), Some("00000000:C1:00.0"));
        assert_eq!(rows[0].driver.as_deref(), Some("535.216.01"));
        assert_eq!(
            parse_cuda(fixture!("a100-sxm4-80gb-x4.nvidia-smi-header.txt")).as_deref(),
            Some("12.2")
        );
    }

    #[test]
    fn a_gpu_in_mig_mode_offers_its_instances_instead() {
        let rows = parse_query(fixture!("a100-sxm4-80gb-x4-gpu0-mig.query-gpu.csv"), true);
        let migs = parse_list(fixture!("a100-sxm4-80gb-x4-gpu0-mig.nvidia-smi-L.txt"));
        assert_eq!(migs.len(), 4);
        let gpus = devices(&rows, &migs);
        assert_eq!(gpus.len(), 3 + 4);
        let mig: Vec<&Gpu> = gpus.iter().filter(|g| g.mig_profile.is_some()).collect();
        assert_eq!(mig.len(), 4);
        assert!(mig
            .iter()
            .all(|g| g.uuid.starts_with("MIG-") && g.index == 0));
        assert_eq!(mig[0].memory_mb, 20 * 1024);
        assert_eq!(mig[0].model, "NVIDIA A100-SXM4-80GB MIG 1g.20gb");
        assert!(
            !gpus.iter().any(|g| g.uuid == rows[0].uuid),
            "the MIG parent is not offered whole"
        );
        // An H100 cut into instances of two profiles.
        let h100 = devices(
            &parse_query(fixture!("h100-80gb-hbm3-mig.query-gpu.csv"), true),
            &parse_list(fixture!("h100-80gb-hbm3-mig.nvidia-smi-L.txt")),
        );
        let profiles: Vec<&str> = h100
            .iter()
            .filter_map(|g| g.mig_profile.as_deref())
            .collect();
        assert_eq!(
            profiles,
            vec![
                "1c.3g.40gb",
                "1c.3g.40gb",
                "1c.3g.40gb",
                "1g.10gb",
                "1g.10gb"
            ]
        );
        assert_eq!(h100[3].memory_mb, 10 * 1024);
        assert_eq!(
            parse_cuda(fixture!("h100-80gb-hbm3-mig.nvidia-smi-header.txt")).as_deref(),
            Some("12.8")
        );
    }

    #[test]
    fn a_workstation_and_wsl2_read_alike_and_unknown_values_stay_unknown() {
        let one = parse_query(fixture!("rtx4090-x1.query-gpu.csv"), true);
        assert_eq!(one.len(), 1);
        assert!(!one[0].mig, "[N/A] is not MIG mode");
        assert_eq!(one[0].memory_mb, 24564);
        let wsl = parse_query(fixture!("wsl2-rtx4070-laptop.query-gpu.csv"), true);
        assert_eq!(wsl[0].name, "NVIDIA GeForce RTX 4070 Laptop GPU");
        assert_eq!(wsl[0].driver.as_deref(), Some("566.36"));
        // On WSL2 the banner names the Windows driver; the CUDA version reads the same.
        assert_eq!(
            parse_cuda(fixture!("wsl2-2x-rtx3090.nvidia-smi-header.txt")).as_deref(),
            Some("12.2")
        );
        assert_eq!(
            parse_cuda(fixture!(
                "wsl2-quadro-rtx4000-in-docker.nvidia-smi-header.txt"
            ))
            .as_deref(),
            Some("12.0")
        );
        // From R610 the banner says `CUDA UMD Version`.
        assert_eq!(
            parse_cuda(fixture!("edge-r610-header.nvidia-smi-header.txt")).as_deref(),
            Some("13.3")
        );
        assert_eq!(
            parse_query(fixture!("edge-no-driver.stdout.txt"), true),
            vec![]
        );
    }

    /// A stand-in `nvidia-smi` that answers as `responses` says, by its first argument.
    fn stand_in(
        dir: &std::path::Path,
        query: &str,
        list: &str,
        banner: &str,
        old: bool,
    ) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let write = |name: &str, text: &str| std::fs::write(dir.join(name), text);
        let _ = (
            write("query", query),
            write("list", list),
            write("banner", banner),
        );
        let refuse = if old {
            format!(
                "case \"$1\" in *compute_cap*) cat {}; exit 2;; esac\n",
                dir.join("old").display()
            )
        } else {
            String::new()
        };
        let _ = write(
            "old",
            include_str!("../fixtures/gpu/edge-old-driver-compute_cap.stdout.txt"),
        );
        let script = format!(
            "#!/bin/sh\n{refuse}case \"$1\" in\n  --query-gpu=*) cat {q};;\n  -L) cat {l};;\n  *) cat {b};;\nesac\n",
            q = dir.join("query").display(),
            l = dir.join("list").display(),
            b = dir.join("banner").display(),
        );
        let path = dir.join("nvidia-smi");
        let _ = std::fs::write(&path, script);
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755));
        path
    }

    #[test]
    fn nvidia_smi_is_asked_as_a_node_without_nvml_would() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let smi = stand_in(
            dir.path(),
            fixture!("a100-sxm4-80gb-x4-gpu0-mig.query-gpu.csv"),
            fixture!("a100-sxm4-80gb-x4-gpu0-mig.nvidia-smi-L.txt"),
            fixture!("a100-sxm4-80gb-x4.nvidia-smi-header.txt"),
            false,
        );
        let found = from_smi(&smi.display().to_string());
        assert_eq!(found.source, "nvidia-smi");
        assert_eq!(found.gpus.len(), 7);
        assert_eq!(found.driver.as_deref(), Some("535.216.01"));
        assert_eq!(found.cuda.as_deref(), Some("12.2"));
        // A driver too old for compute_cap: asked again without it.
        let old_dir = tempfile::tempdir()?;
        let old_rows =
            "0, GPU-aaaa, Tesla V100-SXM2-16GB, 16384, 470.256.02, Disabled, 00000000:00:1E.0\n";
        let smi = stand_in(old_dir.path(), old_rows, "", "", true);
        let found = from_smi(&smi.display().to_string());
        assert_eq!(found.gpus.len(), 1, "{found:?}");
        assert_eq!(found.gpus[0].compute_capability, None);
        assert_eq!(found.gpus[0].uuid, "GPU-aaaa");
        // No nvidia-smi at all: no GPU and no problem to report.
        let none = from_smi("/nonexistent/nvidia-smi");
        assert_eq!(
            (none.gpus.len(), none.source, none.problem),
            (0, "none", None)
        );
        Ok(())
    }
}
