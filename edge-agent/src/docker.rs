//! Tasks as Docker containers, through the local Docker socket only.
//! Containers never get the socket, privileges or the host network; they run
//! with dropped capabilities, no new privileges and a pids limit.

use std::collections::HashMap;

use bollard::models::{ContainerCreateBody, DeviceRequest, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, LogsOptions, RemoveContainerOptions,
    StopContainerOptions, WaitContainerOptions,
};
use bollard::Docker;
use futures::StreamExt;
use ud_schemas::dispatch::DispatchRun;
use ud_schemas::{NodeId, TaskId};

use crate::AgentError;

pub const LABEL_NODE: &str = "io.unidesk.node";
pub const LABEL_TASK: &str = "io.unidesk.task";
pub const LABEL_ATTEMPT: &str = "io.unidesk.attempt";
pub const PIDS_LIMIT: i64 = 4096;

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

    pub async fn image_id(&self, image: &str) -> String {
        self.docker
            .inspect_image(image)
            .await
            .ok()
            .and_then(|i| i.id)
            .unwrap_or_default()
    }

    pub fn client(&self) -> Docker {
        self.docker.clone()
    }

    pub async fn version(&self) -> Option<String> {
        self.docker.version().await.ok().and_then(|v| v.version)
    }

    /// Creates and starts the task's container; returns its id.
    /// `workspace`, when given, is the task's code, mounted at `/workspace`.
    pub async fn create(
        &self,
        image: &str,
        run: &DispatchRun,
        workspace: Option<&std::path::Path>,
    ) -> Result<String, AgentError> {
        let spec = &run.spec;
        let mut cmd = spec.command.clone();
        cmd.extend(spec.args.iter().cloned());
        let labels = HashMap::from([
            (LABEL_NODE.to_owned(), self.node.to_string()),
            (LABEL_TASK.to_owned(), run.task_id.to_string()),
            (LABEL_ATTEMPT.to_owned(), run.attempt.to_string()),
        ]);
        let gpus = (spec.resources.gpus > 0).then(|| {
            vec![DeviceRequest {
                driver: Some("nvidia".into()),
                count: Some(i64::from(spec.resources.gpus)),
                capabilities: Some(vec![vec!["gpu".into()]]),
                ..Default::default()
            }]
        });
        let host = HostConfig {
            nano_cpus: Some(i64::from(spec.resources.cpu_millis) * 1_000_000),
            memory: Some(
                i64::try_from(spec.resources.memory_mb.saturating_mul(1024 * 1024))
                    .unwrap_or(i64::MAX),
            ),
            pids_limit: Some(PIDS_LIMIT),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges".into()]),
            network_mode: Some("none".into()),
            privileged: Some(false),
            device_requests: gpus,
            binds: workspace.map(|w| vec![format!("{}:/workspace", w.display())]),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(image.to_owned()),
            cmd: Some(cmd),
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(labels),
            working_dir: workspace.map(|_| "/workspace".to_owned()),
            host_config: Some(host),
            ..Default::default()
        };
        let name = format!("ud-{}-{}", run.task_id, run.attempt);
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name),
                    ..Default::default()
                }),
                body,
            )
            .await?;
        if let Err(e) = self.docker.start_container(&created.id, None).await {
            let _ = self.remove(&created.id).await;
            return Err(e.into());
        }
        Ok(created.id)
    }

    /// Containers this node started: (task, attempt, container id).
    pub async fn ours(&self) -> Result<Vec<(TaskId, u32, String)>, AgentError> {
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
            .filter_map(|c| {
                let labels = c.labels?;
                let task = labels.get(LABEL_TASK)?.parse().ok()?;
                let attempt = labels.get(LABEL_ATTEMPT)?.parse().ok()?;
                Some((task, attempt, c.id?))
            })
            .collect())
    }

    /// Exit code once the container stops.
    pub async fn wait(&self, container: &str) -> Result<i32, AgentError> {
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
            None => Err(AgentError::Nats("wait ended without a status".into())),
        }
    }

    /// Graceful signal, then kill after `grace` seconds.
    pub async fn stop(&self, container: &str, grace: u32) -> Result<(), AgentError> {
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

    pub async fn remove(&self, container: &str) -> Result<(), AgentError> {
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

    /// Follows stdout and stderr until the container ends, handing each chunk to `sink`.
    pub async fn follow_logs<F, Fut>(&self, container: &str, sink: F)
    where
        F: Fn(&'static str, String) -> Fut,
        Fut: std::future::Future<Output = Result<(), AgentError>>,
    {
        let opts = LogsOptions {
            follow: true,
            stdout: true,
            stderr: true,
            tail: "all".into(),
            ..Default::default()
        };
        let mut logs = self.docker.logs(container, Some(opts));
        while let Some(Ok(out)) = logs.next().await {
            let (stream, bytes) = match out {
                bollard::container::LogOutput::StdErr { message } => ("stderr", message),
                bollard::container::LogOutput::StdOut { message }
                | bollard::container::LogOutput::Console { message } => ("stdout", message),
                bollard::container::LogOutput::StdIn { .. } => continue,
            };
            if sink(stream, String::from_utf8_lossy(&bytes).into_owned())
                .await
                .is_err()
            {
                tracing::warn!("log chunk not recorded");
            }
        }
    }
}
