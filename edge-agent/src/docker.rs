//! Tasks as Docker containers, through the local Docker socket only.
//! Containers never get the socket, privileges or the host network; they run
//! with dropped capabilities, no new privileges and a pids limit.

use std::collections::HashMap;
use std::time::Duration;

use bollard::models::{ContainerCreateBody, DeviceRequest, HostConfig, ResourcesUlimits};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, LogsOptions, RemoveContainerOptions,
    StopContainerOptions, WaitContainerOptions,
};
use bollard::Docker;
use futures::StreamExt;
use ud_schemas::spec::NetworkMode;
use ud_schemas::{now_millis, Millis, NodeId};

use crate::runtime::*;
use crate::AgentError;

pub use crate::runtime::{labels, Adopted, Launch, LABEL_NODE, LABEL_TASK};

pub const PIDS_LIMIT: i64 = 4096;

/// `/dev/shm` when the task does not say: half its memory, at most 16 GiB
/// (PyTorch's DataLoader workers pass batches through it; Docker's 64 MiB
/// kills them).
pub fn default_shm_mb(memory_mb: u64) -> u64 {
    (memory_mb / 2).clamp(64, 16 * 1024)
}

/// The stack size NVIDIA recommends for GPU containers.
pub const GPU_STACK_BYTES: i64 = 64 * 1024 * 1024;

/// A run's container: its limits, its GPU devices by id (never a count:
/// Docker turns a count into devices 0..n), its network, shared memory and
/// private IPC, no privileges, and the labels a restarted agent reads.
pub fn container(
    node: &NodeId,
    l: &Launch<'_>,
    started_at: Millis,
    started_boot: Option<&str>,
) -> ContainerCreateBody {
    let spec = &l.run.spec;
    let mut cmd = spec.command.clone();
    cmd.extend(spec.args.iter().cloned());
    let gpu = !l.run.gpus.is_empty();
    let devices = gpu.then(|| {
        vec![DeviceRequest {
            driver: Some("nvidia".into()),
            device_ids: Some(l.run.gpus.clone()),
            capabilities: Some(vec![vec!["gpu".into()]]),
            ..Default::default()
        }]
    });
    // NVIDIA's recommended limits for GPU work: locked memory for pinned
    // host buffers, a larger stack.
    let ulimits = gpu.then(|| {
        vec![
            ResourcesUlimits {
                name: Some("memlock".into()),
                soft: Some(-1),
                hard: Some(-1),
            },
            ResourcesUlimits {
                name: Some("stack".into()),
                soft: Some(GPU_STACK_BYTES),
                hard: Some(GPU_STACK_BYTES),
            },
        ]
    });
    // A task with ports must be reachable by the agent, never through the
    // host's network: without egress it joins an internal network (no
    // route out, no traffic between its containers).
    let network = match spec.resources.network {
        NetworkMode::None if spec.ports.is_empty() => "none",
        NetworkMode::None => l.sessions_network,
        NetworkMode::Egress => l.egress_network,
    };
    let shm_mb = spec
        .shm_size_mb
        .unwrap_or_else(|| default_shm_mb(spec.resources.memory_mb));
    let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    // Exactly the devices given (and none on a node whose default runtime
    // would otherwise show every GPU to a CPU task).
    env.push(format!(
        "NVIDIA_VISIBLE_DEVICES={}",
        if gpu {
            l.run.gpus.join(",")
        } else {
            "void".into()
        }
    ));
    if let Some(s) = &spec.session {
        // Served under /s/<id>/ where sessions have no host of their own.
        env.push(format!("UD_SESSION_ID={}", s.id));
        env.push(format!("UD_SESSION_PORT={}", s.port));
    }
    env.extend(l.secrets.iter().map(|(k, v)| format!("{k}={v}")));
    let mb = |m: u64| i64::try_from(m.saturating_mul(1024 * 1024)).unwrap_or(i64::MAX);
    let host = HostConfig {
        nano_cpus: Some(i64::from(spec.resources.cpu_millis) * 1_000_000),
        memory: Some(mb(spec.resources.memory_mb)),
        pids_limit: Some(PIDS_LIMIT),
        cap_drop: Some(vec!["ALL".into()]),
        security_opt: Some(vec!["no-new-privileges".into()]),
        network_mode: Some(network.to_owned()),
        privileged: Some(false),
        ipc_mode: Some("private".into()),
        shm_size: Some(mb(shm_mb)),
        ulimits,
        device_requests: devices,
        binds: {
            let binds: Vec<String> = l
                .workspace
                .map(|w| format!("{}:/workspace", w.display()))
                .into_iter()
                .chain(l.shared.map(|s| format!("{}:/shared", s.display())))
                .collect();
            (!binds.is_empty()).then_some(binds)
        },
        ..Default::default()
    };
    ContainerCreateBody {
        image: Some(l.image.to_owned()),
        cmd: Some(cmd),
        env: Some(env),
        labels: Some({
            let mut labels = labels(node, l.run, l.workspace, started_at);
            if let Some(s) = l.shared {
                labels.insert(LABEL_SHARED.to_owned(), s.display().to_string());
            }
            if let Some(b) = started_boot {
                labels.insert(LABEL_STARTED_BOOT.to_owned(), b.to_owned());
            }
            labels
        }),
        working_dir: l.workspace.map(|_| "/workspace".to_owned()),
        host_config: Some(host),
        ..Default::default()
    }
}

#[derive(Clone)]
pub struct Executor {
    docker: Docker,
    node: NodeId,
}

impl Executor {
    pub async fn connect(host: Option<&str>, node: NodeId) -> Result<Self, AgentError> {
        let docker = match host {
            Some(h) => Docker::connect_with_unix(
                h.trim_start_matches("unix://"),
                120,
                bollard::API_DEFAULT_VERSION,
            )?,
            None => Docker::connect_with_local_defaults()?,
        };
        let docker = docker.negotiate_version().await?;
        Ok(Self { docker, node })
    }

    pub fn client(&self) -> Docker {
        self.docker.clone()
    }

    /// Makes the private bridge network `egress` tasks join (once): no
    /// traffic between its containers, and its bridge named `bridge` so that
    /// the host's firewall can keep it from the host's own services.
    pub async fn ensure_egress_network(&self, name: &str, bridge: &str) -> Result<(), AgentError> {
        let bridge = (
            "com.docker.network.bridge.name".to_owned(),
            bridge.to_owned(),
        );
        self.ensure_network(name, false, Some(bridge)).await
    }

    /// Makes the internal network tasks with ports join (once): no route
    /// out of it, no traffic between its containers; the host (the agent)
    /// reaches them.
    pub async fn ensure_sessions_network(&self, name: &str) -> Result<(), AgentError> {
        self.ensure_network(name, true, None).await
    }

    /// A bridge network of this node without traffic between its
    /// containers, made unless it exists. Engines before API 1.44 let
    /// agents starting together on one engine make several networks of one
    /// name, which makes the name ambiguous and takes an address pool each;
    /// every agent therefore keeps the oldest and removes the others.
    async fn ensure_network(
        &self,
        name: &str,
        internal: bool,
        option: Option<(String, String)>,
    ) -> Result<(), AgentError> {
        let made = if self.named_networks(name).await?.is_empty() {
            let mut options = HashMap::from([(
                "com.docker.network.bridge.enable_icc".to_owned(),
                "false".to_owned(),
            )]);
            options.extend(option);
            let made = self
                .docker
                .create_network(bollard::models::NetworkCreateRequest {
                    name: name.to_owned(),
                    driver: Some("bridge".into()),
                    internal: Some(internal),
                    options: Some(options),
                    labels: Some(HashMap::from([(
                        LABEL_NODE.to_owned(),
                        self.node.to_string(),
                    )])),
                    ..Default::default()
                })
                .await;
            match made {
                Ok(m) => Some(m.id),
                // Made by another agent in the meantime.
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 409, ..
                }) => None,
                Err(e) => return Err(e.into()),
            }
        } else {
            None
        };
        let mut found = self.named_networks(name).await?;
        found.sort();
        for (_, id) in found.iter().skip(1) {
            match self.docker.remove_network(id).await {
                Ok(()) => {
                    tracing::info!(
                        network = name,
                        id = id.as_str(),
                        "removed a duplicate network"
                    )
                }
                // In use, or removed by another agent already.
                Err(e) if made.as_deref() != Some(id.as_str()) => {
                    tracing::debug!(network = name, error = %e, "duplicate network left")
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The networks of exactly this name, as (made at, id).
    async fn named_networks(&self, name: &str) -> Result<Vec<(String, String)>, AgentError> {
        let list = self
            .docker
            .list_networks(Some(bollard::query_parameters::ListNetworksOptions {
                filters: Some(HashMap::from([("name".to_owned(), vec![name.to_owned()])])),
            }))
            .await?;
        Ok(list
            .into_iter()
            .filter(|n| n.name.as_deref() == Some(name))
            .filter_map(|n| Some((n.created.unwrap_or_default(), n.id?)))
            .collect())
    }

    /// Whether the engine can give containers NVIDIA GPUs (the NVIDIA
    /// Container Toolkit's runtime, or CDI specifications).
    pub async fn gives_gpus(&self) -> bool {
        match self.docker.info().await {
            Ok(info) => {
                info.runtimes.is_some_and(|r| r.contains_key("nvidia"))
                    || info.discovered_devices.unwrap_or_default().iter().any(|d| {
                        d.id.as_deref()
                            .is_some_and(|id| id.starts_with("nvidia.com/gpu"))
                    })
            }
            Err(_) => false,
        }
    }
}

#[async_trait::async_trait]
impl Runtime for Executor {
    async fn image_id(&self, image: &str) -> String {
        self.docker
            .inspect_image(image)
            .await
            .ok()
            .and_then(|i| i.id)
            .unwrap_or_default()
    }

    async fn version(&self) -> Option<String> {
        self.docker.version().await.ok().and_then(|v| v.version)
    }

    /// Creates and starts the task's container as [`container`] describes
    /// it; returns its id.
    async fn create(&self, launch: &Launch<'_>) -> Result<String, AgentError> {
        let name = format!("ud-{}-{}", launch.run.task_id, launch.run.attempt);
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name),
                    ..Default::default()
                }),
                container(
                    &self.node,
                    launch,
                    now_millis(),
                    crate::boot::stamp().as_deref(),
                ),
            )
            .await?;
        if let Err(e) = self.docker.start_container(&created.id, None).await {
            let _ = self.remove(&created.id).await;
            return Err(e.into());
        }
        Ok(created.id)
    }

    /// The container's address on its network (none without one).
    async fn address(&self, container: &str) -> Option<std::net::IpAddr> {
        let c = self
            .docker
            .inspect_container(
                container,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
            .ok()?;
        c.network_settings?
            .networks?
            .values()
            .filter_map(|n| n.ip_address.as_deref())
            .find_map(|ip| ip.parse().ok())
    }

    /// Containers this node started, running or not.
    async fn ours(&self) -> Result<Vec<Adopted>, AgentError> {
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![format!("{LABEL_NODE}={}", self.node)],
        )]);
        let list = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await?;
        Ok(list
            .into_iter()
            .filter_map(|c| Adopted::from_labels(&self.node, c.id?, &c.labels?))
            .collect())
    }

    /// Exit code once the container stops.
    async fn wait(&self, container: &str) -> Result<i32, AgentError> {
        let mut s = self
            .docker
            .wait_container(container, None::<WaitContainerOptions>);
        match s.next().await {
            Some(Ok(r)) => Ok(i32::try_from(r.status_code).unwrap_or(-1)),
            // A non-zero exit arrives as an error carrying the code.
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => {
                Ok(i32::try_from(code).unwrap_or(-1))
            }
            Some(Err(e)) => Err(e.into()),
            None => Err(AgentError::NoExitStatus(container.to_owned())),
        }
    }

    /// Starts a container that was made and never started (the agent
    /// stopped between the two); says whether it did.
    async fn start_if_created(&self, container: &str) -> Result<bool, AgentError> {
        let state = self
            .docker
            .inspect_container(
                container,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await?
            .state;
        let created = state.and_then(|s| s.status)
            == Some(bollard::models::ContainerStateStatusEnum::CREATED);
        if created {
            self.docker.start_container(container, None).await?;
        }
        Ok(created)
    }

    /// When a stopped container ended (ms since the epoch); `None` while it
    /// runs or when the engine does not say.
    async fn finished_at(&self, container: &str) -> Option<Millis> {
        let state = self
            .docker
            .inspect_container(
                container,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
            .ok()?
            .state?;
        if state.running == Some(true) {
            return None;
        }
        let finished = chrono::DateTime::parse_from_rfc3339(&state.finished_at?).ok()?;
        // Docker says "0001-01-01T00:00:00Z" for a container that never ran.
        Some(finished.timestamp_millis()).filter(|ms| *ms > 0)
    }

    /// Graceful signal, then kill after `grace` seconds.
    async fn stop(&self, container: &str, grace: u32) -> Result<(), AgentError> {
        self.docker
            .stop_container(
                container,
                Some(StopContainerOptions {
                    t: Some(i32::try_from(grace).unwrap_or(10)),
                    signal: None,
                }),
            )
            .await?;
        Ok(())
    }

    async fn remove(&self, container: &str) -> Result<(), AgentError> {
        self.docker
            .remove_container(
                container,
                Some(RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await?;
        Ok(())
    }

    /// Follows stdout and stderr until the container ends, handing each
    /// chunk after `after` (the engine's time of the last one sent before,
    /// RFC 3339) to `sink` with its own time.
    async fn follow_logs(&self, container: &str, after: Option<&str>, sink: LogSink) {
        let mut last = after.and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
        // Followed while the container runs; a broken stream is followed
        // again from the last line sent.
        for tries in 1.. {
            match self.read_logs(container, true, &mut last, &sink).await {
                Ok(()) if !self.is_running(container).await => break,
                Ok(()) => {}
                Err(e) if tries < LOG_TRIES => {
                    tracing::warn!(error = %e, "the run's log stream broke; following it again");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot follow the run's logs");
                    break;
                }
            }
            if tries >= LOG_TRIES {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200 * u64::from(tries))).await;
        }
        // Read once more after the end: lines written as the container
        // stopped can miss a follower.
        if let Err(e) = self.read_logs(container, false, &mut last, &sink).await {
            tracing::warn!(error = %e, "cannot read the run's last log lines");
        }
    }
}

/// How often the agent opens a run's log stream at most.
const LOG_TRIES: u32 = 5;

impl Executor {
    /// Whether the container still runs (false when it cannot be told).
    async fn is_running(&self, container: &str) -> bool {
        self.docker
            .inspect_container(
                container,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
            .ok()
            .and_then(|c| c.state)
            .and_then(|s| s.running)
            .unwrap_or(false)
    }

    /// Hands the container's log chunks after `last` to `sink` (until it
    /// stops, with `follow`), moving `last` on.
    async fn read_logs(
        &self,
        container: &str,
        follow: bool,
        last: &mut Option<chrono::DateTime<chrono::FixedOffset>>,
        sink: &LogSink,
    ) -> Result<(), bollard::errors::Error> {
        let opts = LogsOptions {
            follow,
            stdout: true,
            stderr: true,
            timestamps: true,
            // Whole seconds: the chunks of that second are sorted out below.
            since: last.map_or(0, |t| i32::try_from(t.timestamp()).unwrap_or(0)),
            tail: "all".into(),
            ..Default::default()
        };
        let mut logs = self.docker.logs(container, Some(opts));
        while let Some(out) = logs.next().await {
            let (stream, bytes) = match out? {
                bollard::container::LogOutput::StdErr { message } => ("stderr", message),
                bollard::container::LogOutput::StdOut { message }
                | bollard::container::LogOutput::Console { message } => ("stdout", message),
                bollard::container::LogOutput::StdIn { .. } => continue,
            };
            let chunk = String::from_utf8_lossy(&bytes);
            let Some((time, text)) = chunk.split_once(' ') else {
                continue;
            };
            let at = chrono::DateTime::parse_from_rfc3339(time).ok();
            if last.is_some_and(|last| at.is_some_and(|at| at <= last)) {
                continue; // sent already (before a restart, or by an earlier read)
            }
            if sink(stream, text.to_owned(), time.to_owned())
                .await
                .is_err()
            {
                tracing::warn!("log chunk not recorded");
            }
            if at.is_some() {
                *last = at;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ud_schemas::dispatch::DispatchRun;
    use ud_schemas::TaskId;

    #[test]
    fn a_restarted_agent_reads_back_what_a_run_needs_from_its_labels() {
        let node = NodeId::new();
        let mut spec = crate::tests::spec();
        spec.timeout_seconds = 15;
        spec.outputs = vec!["result.txt".into(), "out/".into()];
        spec.checkpoint = Some(ud_schemas::spec::Checkpoint {
            path: "ckpt".into(),
            every_seconds: 60,
            from: Some(TaskId::new()),
        });
        spec.ports = vec![6006, 8888];
        spec.session = Some(ud_schemas::spec::Session {
            id: "0".repeat(32),
            port: 8888,
            idle_timeout_seconds: 600,
        });
        let run = DispatchRun {
            at: 1,
            task_id: TaskId::new(),
            attempt: 3,
            spec,
            gpus: vec!["GPU-a".into(), "GPU-b".into()],
            fence_after_seconds: Some(900),
            project: None,
        };
        let w = std::path::Path::new("/var/lib/unidesk-edge/tasks/x-3");
        let mut l = labels(&node, &run, Some(w), 1234);
        l.insert(LABEL_STARTED_BOOT.into(), "b1 5000".into());
        let back = Adopted::from_labels(&node, "c1".into(), &l);
        assert_eq!(
            back,
            Some(Adopted {
                task: run.task_id,
                attempt: 3,
                container: "c1".into(),
                started_at: 1234,
                started_boot: Some("b1 5000".into()),
                timeout_seconds: Some(15),
                outputs: vec!["result.txt".into(), "out/".into()],
                workspace: Some(w.to_owned()),
                gpus: vec!["GPU-a".into(), "GPU-b".into()],
                checkpoint: run.spec.checkpoint.clone(),
                fence_after_seconds: Some(900),
                shared: None,
                ports: vec![6006, 8888],
                idle_timeout_seconds: Some(600),
            })
        );
        // Another node's container is not ours.
        assert_eq!(Adopted::from_labels(&NodeId::new(), "c1".into(), &l), None);
    }
}
