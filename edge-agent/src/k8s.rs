//! Runs as Kubernetes Pods: a cluster joins like a node. The agent runs in
//! the cluster (or anywhere its kubeconfig reaches the API server) and makes
//! one Pod per attempt in its namespace, with no restarts (the platform
//! retries). The task's code is checked out at its commit by an init
//! container into the Pod's workspace volume; the task runs in the image it
//! names or else the node's owner names. Runs with files get their workspace
//! on a ReadWriteMany claim the agent has mounted too, so that the agent
//! moves inputs, outputs, checkpoints and `/shared` with its own transfer
//! code, as on Docker. CPUs, memory and GPUs (`nvidia.com/gpu`) are requests
//! and limits; secrets go in a Secret of the attempt, never in the Pod spec.
//! A restarted agent finds its Pods by their labels and reads what their
//! supervision needs back from their annotations.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use futures::{AsyncBufReadExt, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvFromSource, EnvVar,
    PersistentVolumeClaimVolumeSource, Pod, PodSpec, ResourceRequirements, Secret, SecretEnvSource,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams, WatchEvent, WatchParams};
use ud_schemas::spec::Gpu;
use ud_schemas::{now_millis, Millis, NodeId, NodeResources};

use crate::gpus::Detected;
use crate::runtime::{self, Adopted, Launch, LogSink, Runtime, LABEL_NODE, LABEL_TASK};
use crate::AgentError;

/// The container that runs the task, beside the init container `code`.
pub const TASK_CONTAINER: &str = "task";
/// Label values name the attempt too, for `kubectl get pods -l`.
pub const LABEL_ATTEMPT: &str = runtime::LABEL_ATTEMPT;
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "unidesk");

/// How a node runs its tasks on a cluster (`unidesk-edge run --kubernetes`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The API server: a kubeconfig file, or (none) the in-cluster service
    /// account or `$KUBECONFIG`.
    pub kubeconfig: Option<PathBuf>,
    /// The API server's URL without a kubeconfig (a plain-HTTP proxy such
    /// as `kubectl proxy`).
    pub url: Option<String>,
    /// Where the Pods (and the Secrets of their runs) are made.
    pub namespace: String,
    /// Projects whose Pods go to a namespace of their own (project ->
    /// namespace), for the cluster's quotas and policies per project; the
    /// agent needs the same rights there as in `namespace`.
    pub project_namespaces: BTreeMap<String, String>,
    /// What the cluster offers UniDesk (a quota the admin sets): CPU in
    /// thousandths of a core, memory, and GPUs of one model.
    pub cpu_millis: u32,
    pub memory_mb: u64,
    pub gpus: u32,
    pub gpu_model: String,
    pub gpu_memory_mb: u64,
    /// The image of the init container that checks the code out (it needs
    /// `git` and `sh`).
    pub git_image: String,
    /// Node labels every Pod asks for (`nodeSelector`).
    pub node_selector: BTreeMap<String, String>,
    /// The Volcano queue the Pods go to (their scheduler is then Volcano).
    pub volcano_queue: Option<String>,
    /// The Volcano queue of each UniDesk queue that has one of its own
    /// (others go to `volcano_queue`, or to the cluster's own scheduler).
    pub volcano_queues: BTreeMap<String, String>,
    /// Where runs with files keep their workspace (none: such runs are
    /// refused).
    pub workspace_claim: Option<WorkspaceClaim>,
}

/// A ReadWriteMany PersistentVolumeClaim that the agent has mounted as its
/// work directory: a run's workspace and `/shared` folder, made by the agent
/// below that directory, are mounted into the Pod as sub-paths of the claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkspaceClaim {
    /// The claim's name, in the agent's namespace.
    pub name: String,
    /// Where the agent has it mounted (its work directory).
    pub mounted_at: PathBuf,
}

impl WorkspaceClaim {
    /// The claim's sub-path of a directory the agent made below it.
    fn sub_path(&self, dir: &Path) -> Option<String> {
        let rel = dir.strip_prefix(&self.mounted_at).ok()?;
        let rel = rel.to_str()?;
        (!rel.is_empty()).then(|| rel.to_owned())
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            kubeconfig: None,
            url: None,
            namespace: "unidesk".into(),
            project_namespaces: BTreeMap::new(),
            cpu_millis: 0,
            memory_mb: 0,
            gpus: 0,
            gpu_model: "NVIDIA GPU".into(),
            gpu_memory_mb: 0,
            git_image: "alpine/git:2.47.2".into(),
            node_selector: BTreeMap::new(),
            volcano_queue: None,
            volcano_queues: BTreeMap::new(),
            workspace_claim: None,
        }
    }
}

impl Settings {
    /// The namespace of a run of `project`.
    pub fn namespace_of(&self, project: Option<&str>) -> &str {
        project
            .and_then(|p| self.project_namespaces.get(p))
            .unwrap_or(&self.namespace)
    }

    /// Every namespace the agent makes Pods in.
    fn namespaces(&self) -> Vec<&str> {
        let mut all: Vec<&str> = std::iter::once(self.namespace.as_str())
            .chain(self.project_namespaces.values().map(String::as_str))
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// The GPUs the quota offers, as the scheduler counts them: the cluster
    /// picks the devices, so they are named by their place in the quota.
    pub fn gpus(&self) -> Detected {
        Detected {
            gpus: (0..self.gpus)
                .map(|i| Gpu {
                    model: self.gpu_model.clone(),
                    memory_mb: self.gpu_memory_mb,
                    index: i,
                    uuid: format!("k8s-gpu-{i}"),
                    compute_capability: None,
                    mig_profile: None,
                    pci_bus_id: None,
                })
                .collect(),
            source: "kubernetes",
            ..Detected::default()
        }
    }

    /// What the node offers: the quota, not the agent's own machine.
    pub fn capacity(&self, mut r: NodeResources) -> NodeResources {
        r.cpu_millis = self.cpu_millis;
        r.memory_mb = self.memory_mb;
        r.os = "kubernetes".into();
        r.wsl = false;
        r
    }
}

/// The Pod (and Secret) of an attempt: `ud-<task>-<attempt>`.
pub fn pod_name(l: &Launch<'_>) -> String {
    format!("ud-{}-{}", l.run.task_id, l.run.attempt)
}

/// Why this runtime cannot run a launch yet, if it cannot.
pub fn unsupported(s: &Settings, l: &Launch<'_>) -> Option<String> {
    let spec = &l.run.spec;
    let files = !spec.inputs.is_empty()
        || !spec.outputs.is_empty()
        || spec.checkpoint.is_some()
        || spec.shared.is_some();
    if files || l.workspace.is_some() || l.shared.is_some() {
        let Some(claim) = &s.workspace_claim else {
            return Some("a task with files (inputs, outputs, a checkpoint or /shared) cannot run on this Kubernetes node: it has no workspace claim (UD_K8S_WORKSPACE_CLAIM)".into());
        };
        for dir in l.workspace.iter().chain(l.shared.iter()) {
            if claim.sub_path(dir).is_none() {
                return Some(format!(
                    "{} is not below the workspace claim's mount {}: the agent's work directory must be the claim",
                    dir.display(),
                    claim.mounted_at.display()
                ));
            }
        }
    }
    if !spec.ports.is_empty() || spec.session.is_some() {
        return Some("a task with ports or a session cannot run on a Kubernetes node yet".into());
    }
    if spec.resources.network == ud_schemas::spec::NetworkMode::Egress {
        // The cluster's network policies decide; the node offers `none` only.
        return Some("a task with egress cannot run on a Kubernetes node yet".into());
    }
    None
}

/// The Pod of one attempt: labels to find it by, the run's record in its
/// annotations, the code checked out at its commit, limits, GPUs, no
/// privileges and no service account token.
pub fn pod(node: &NodeId, s: &Settings, l: &Launch<'_>, started_at: Millis) -> Pod {
    let spec = &l.run.spec;
    let name = pod_name(l);
    let mut args = spec.command.clone();
    args.extend(spec.args.iter().cloned());
    let code = !spec.code_repo_url.is_empty();
    let mut env: Vec<EnvVar> = spec
        .env
        .iter()
        .map(|(k, v)| EnvVar {
            name: k.clone(),
            value: Some(v.clone()),
            ..Default::default()
        })
        .collect();
    env.push(EnvVar {
        name: "UD_TASK_ID".into(),
        value: Some(l.run.task_id.to_string()),
        ..Default::default()
    });
    let mut quantities = BTreeMap::from([
        (
            "cpu".to_owned(),
            Quantity(format!("{}m", spec.resources.cpu_millis)),
        ),
        (
            "memory".to_owned(),
            Quantity(format!("{}Mi", spec.resources.memory_mb)),
        ),
    ]);
    if !l.run.gpus.is_empty() {
        quantities.insert(
            "nvidia.com/gpu".into(),
            Quantity(l.run.gpus.len().to_string()),
        );
    }
    let shm_mb = spec
        .shm_size_mb
        .unwrap_or_else(|| crate::docker::default_shm_mb(spec.resources.memory_mb));
    let mut mounts = vec![VolumeMount {
        name: "dshm".into(),
        mount_path: "/dev/shm".into(),
        ..Default::default()
    }];
    let mut volumes = vec![Volume {
        name: "dshm".into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".into()),
            size_limit: Some(Quantity(format!("{shm_mb}Mi"))),
        }),
        ..Default::default()
    }];
    let mut init = Vec::new();
    // A run with files has its workspace (and `/shared`) below the agent's
    // work directory, on the claim; a run with code alone, a volume of its
    // own Pod.
    let claim = s.workspace_claim.as_ref();
    let sub = |dir: Option<&Path>| Some((claim?, claim?.sub_path(dir?)?));
    if let Some((c, _)) = sub(l.workspace).or(sub(l.shared)) {
        volumes.push(Volume {
            name: "files".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: c.name.clone(),
                read_only: Some(false),
            }),
            ..Default::default()
        });
    }
    if let Some((_, path)) = sub(l.shared) {
        mounts.push(VolumeMount {
            name: "files".into(),
            mount_path: "/shared".into(),
            sub_path: Some(path),
            ..Default::default()
        });
    }
    let workspace = match sub(l.workspace) {
        Some((_, path)) => Some(VolumeMount {
            name: "files".into(),
            mount_path: "/workspace".into(),
            sub_path: Some(path),
            ..Default::default()
        }),
        None if code => {
            volumes.push(Volume {
                name: "workspace".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Default::default()
            });
            Some(VolumeMount {
                name: "workspace".into(),
                mount_path: "/workspace".into(),
                ..Default::default()
            })
        }
        None => None,
    };
    if let Some(w) = &workspace {
        mounts.push(w.clone());
    }
    if let (true, Some(workspace)) = (code, workspace.clone()) {
        init.push(Container {
            name: "code".into(),
            image: Some(s.git_image.clone()),
            command: Some(vec!["sh".into(), "-ec".into(), CHECKOUT.into()]),
            env: Some(vec![
                EnvVar {
                    name: "UD_CODE_REPO".into(),
                    value: Some(spec.code_repo_url.clone()),
                    ..Default::default()
                },
                EnvVar {
                    name: "UD_CODE_COMMIT".into(),
                    value: Some(spec.code_commit_id.clone()),
                    ..Default::default()
                },
            ]),
            volume_mounts: Some(vec![workspace]),
            security_context: Some(unprivileged()),
            resources: Some(ResourceRequirements {
                requests: Some(BTreeMap::from([
                    ("cpu".to_owned(), Quantity("100m".into())),
                    ("memory".to_owned(), Quantity("128Mi".into())),
                ])),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let task = Container {
        name: TASK_CONTAINER.into(),
        image: Some(l.image.to_owned()),
        // As Docker's command: the image's entrypoint stays.
        args: Some(args),
        env: Some(env),
        env_from: (!l.secrets.is_empty()).then(|| {
            vec![EnvFromSource {
                secret_ref: Some(SecretEnvSource {
                    name: name.clone(),
                    optional: Some(false),
                }),
                ..Default::default()
            }]
        }),
        working_dir: workspace.is_some().then(|| "/workspace".to_owned()),
        volume_mounts: Some(mounts),
        resources: Some(ResourceRequirements {
            requests: Some(quantities.clone()),
            limits: Some(quantities),
            ..Default::default()
        }),
        security_context: Some(unprivileged()),
        ..Default::default()
    };
    let mut selector = s.node_selector.clone();
    if let (Some(model), false) = (&spec.resources.gpu_model, l.run.gpus.is_empty()) {
        // The label NVIDIA's GPU feature discovery puts on nodes.
        selector.insert("nvidia.com/gpu.product".into(), model.replace(' ', "-"));
    }
    let mut annotations: BTreeMap<String, String> = runtime::labels(node, l.run, None, started_at)
        .into_iter()
        .collect();
    let volcano = s
        .volcano_queues
        .get(&spec.queue)
        .or(s.volcano_queue.as_ref());
    if let Some(q) = volcano {
        annotations.insert("scheduling.volcano.sh/queue-name".into(), q.clone());
    }
    Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(s.namespace_of(l.run.project.as_deref()).to_owned()),
            labels: Some(BTreeMap::from([
                (LABEL_NODE.to_owned(), node.to_string()),
                (LABEL_TASK.to_owned(), l.run.task_id.to_string()),
                (LABEL_ATTEMPT.to_owned(), l.run.attempt.to_string()),
                (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
            ])),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            // The agent stops a run with its own grace; the Pod's is the most.
            termination_grace_period_seconds: Some(30),
            active_deadline_seconds: i64::try_from(spec.timeout_seconds)
                .ok()
                .filter(|t| *t > 0)
                // The agent stops it at its limit; the cluster, should the
                // agent be gone, a minute later.
                .map(|t| t.saturating_add(60)),
            scheduler_name: volcano.map(|_| "volcano".to_owned()),
            node_selector: (!selector.is_empty()).then_some(selector),
            init_containers: (!init.is_empty()).then_some(init),
            containers: vec![task],
            volumes: Some(volumes),
            ..Default::default()
        }),
        status: None,
    }
}

/// Fetches exactly the commit into the workspace (servers that refuse a
/// fetch by id get a full clone).
const CHECKOUT: &str = r#"cd /workspace
git init -q .
git remote add origin "$UD_CODE_REPO"
git fetch -q --depth 1 origin "$UD_CODE_COMMIT" || git fetch -q origin
git checkout -q --detach "$UD_CODE_COMMIT"
echo "checked out $UD_CODE_COMMIT""#;

fn unprivileged() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        ..Default::default()
    }
}

/// The Secret of an attempt's secrets, named as its Pod.
pub fn secret(namespace: &str, name: &str, node: &NodeId, values: &[(String, String)]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                (LABEL_NODE.to_owned(), node.to_string()),
                (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
            ])),
            ..Default::default()
        },
        string_data: Some(values.iter().cloned().collect()),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// How an attempt's Pod stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Not ended yet.
    Going,
    /// The task container ended with this code, at this time.
    Ended(i32, Option<Millis>),
    /// The Pod failed without the task's exit (evicted, its deadline, an
    /// image that cannot be pulled...).
    Failed(String),
}

/// Reads a Pod's status.
pub fn phase(p: &Pod) -> Phase {
    let Some(status) = &p.status else {
        return Phase::Going;
    };
    let task = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == TASK_CONTAINER);
    if let Some(t) = task
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref())
    {
        let at = t.finished_at.as_ref().map(|f| f.0.as_millisecond());
        return Phase::Ended(t.exit_code, at);
    }
    match status.phase.as_deref() {
        Some("Failed") => Phase::Failed(
            status
                .message
                .clone()
                .or_else(|| status.reason.clone())
                .unwrap_or_else(|| "the Pod failed".into()),
        ),
        // Succeeded without a status of the task container is not seen;
        // an init container that failed is.
        _ => match status
            .init_container_statuses
            .iter()
            .flatten()
            .find_map(|c| {
                c.state
                    .as_ref()?
                    .terminated
                    .as_ref()
                    .filter(|t| t.exit_code != 0)
            }) {
            Some(t) => Phase::Failed(format!(
                "checking the code out failed (exit {}): {}",
                t.exit_code,
                t.message.clone().unwrap_or_default()
            )),
            None => Phase::Going,
        },
    }
}

/// Runs as Pods. A run's id is `<namespace>/<Pod name>`.
#[derive(Clone)]
pub struct Pods {
    client: kube::Client,
    settings: Settings,
    node: NodeId,
}

impl Pods {
    pub async fn connect(settings: Settings, node: NodeId) -> Result<Self, AgentError> {
        let config = match (&settings.url, &settings.kubeconfig) {
            (Some(url), _) => kube::Config::new(
                url.parse()
                    .map_err(|e| AgentError::Refused(format!("the Kubernetes URL {url}: {e}")))?,
            ),
            (None, Some(path)) => {
                let file = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| AgentError::Refused(format!("{}: {e}", path.display())))?;
                kube::Config::from_custom_kubeconfig(file, &Default::default())
                    .await
                    .map_err(|e| AgentError::Refused(format!("{}: {e}", path.display())))?
            }
            (None, None) => kube::Config::infer()
                .await
                .map_err(|e| AgentError::Refused(format!("no Kubernetes configuration: {e}")))?,
        };
        // Other crates of the process bring a second TLS backend; the
        // Kubernetes client needs one chosen.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = kube::Client::try_from(config)?;
        Ok(Self::with_client(client, settings, node))
    }

    pub fn with_client(client: kube::Client, settings: Settings, node: NodeId) -> Self {
        Self {
            client,
            settings,
            node,
        }
    }

    /// The namespace and name of a run's Pod (and Secret).
    fn split<'a>(&'a self, id: &'a str) -> (&'a str, &'a str) {
        id.split_once('/')
            .unwrap_or((self.settings.namespace.as_str(), id))
    }

    fn pods(&self, namespace: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), namespace)
    }

    fn secrets(&self, namespace: &str) -> Api<Secret> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// The Pod's status now; `None` once it is gone.
    async fn status(&self, id: &str) -> Result<Option<Pod>, AgentError> {
        let (ns, name) = self.split(id);
        Ok(self.pods(ns).get_opt(name).await?)
    }

    /// Waits for the Pod to change after `version`, up to `seconds`.
    async fn changed(&self, id: &str, version: &str, seconds: u32) -> Result<(), AgentError> {
        let (ns, name) = self.split(id);
        let params = WatchParams::default()
            .fields(&format!("metadata.name={name}"))
            .timeout(seconds);
        let mut events = self.pods(ns).watch(&params, version).await?.boxed();
        while let Some(e) = events.try_next().await? {
            match e {
                WatchEvent::Bookmark(_) => {}
                WatchEvent::Error(e) if e.code == 410 => return Ok(()),
                WatchEvent::Error(e) => return Err(kube::Error::Api(e).into()),
                _ => return Ok(()),
            }
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Runtime for Pods {
    async fn create(&self, l: &Launch<'_>) -> Result<String, AgentError> {
        if let Some(why) = unsupported(&self.settings, l) {
            return Err(AgentError::Refused(why));
        }
        let name = pod_name(l);
        let ns = self.settings.namespace_of(l.run.project.as_deref());
        if !l.secrets.is_empty() {
            let secret = secret(ns, &name, &self.node, l.secrets);
            match self
                .secrets(ns)
                .create(&PostParams::default(), &secret)
                .await
            {
                Ok(_) => {}
                // Made by this agent before a restart.
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
        }
        let pod = pod(&self.node, &self.settings, l, now_millis());
        match self.pods(ns).create(&PostParams::default(), &pod).await {
            Ok(_) => Ok(format!("{ns}/{name}")),
            Err(kube::Error::Api(e)) if e.code == 409 => Err(AgentError::Refused(format!(
                "the Pod {name} exists already: the attempt was started before"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    async fn start_if_created(&self, _: &str) -> Result<bool, AgentError> {
        // A Pod starts by itself.
        Ok(false)
    }

    async fn wait(&self, name: &str) -> Result<i32, AgentError> {
        loop {
            let Some(pod) = self.status(name).await? else {
                return Err(AgentError::NoExitStatus(name.to_owned()));
            };
            let now = phase(&pod);
            tracing::debug!(pod = name, phase = ?now, "pod");
            match now {
                Phase::Ended(code, _) => return Ok(code),
                Phase::Failed(why) => return Err(AgentError::Refused(why)),
                Phase::Going => {}
            }
            let version = pod.metadata.resource_version.unwrap_or_default();
            self.changed(name, &version, 290).await?;
        }
    }

    async fn finished_at(&self, name: &str) -> Option<Millis> {
        match phase(&self.status(name).await.ok()??) {
            Phase::Ended(_, at) => at,
            _ => None,
        }
    }

    async fn stop(&self, id: &str, grace: u32) -> Result<(), AgentError> {
        let (ns, name) = self.split(id);
        let params = DeleteParams {
            grace_period_seconds: Some(grace),
            ..Default::default()
        };
        match self.pods(ns).delete(name, &params).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn remove(&self, id: &str) -> Result<(), AgentError> {
        let (ns, name) = self.split(id);
        let now = DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        for gone in [
            self.pods(ns).delete(name, &now).await.map(|_| ()),
            self.secrets(ns).delete(name, &now).await.map(|_| ()),
        ] {
            match gone {
                Ok(()) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    async fn follow_logs(&self, name: &str, after: Option<&str>, sink: LogSink) {
        let mut after = after.and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
        let params = LogParams {
            container: Some(TASK_CONTAINER.into()),
            follow: true,
            timestamps: true,
            ..Default::default()
        };
        loop {
            // The log is there once the container has started.
            let pod = match self.status(name).await {
                Ok(Some(p)) => p,
                _ => return,
            };
            let started = pod
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.iter().find(|c| c.name == TASK_CONTAINER))
                .and_then(|c| c.state.as_ref())
                .is_some_and(|s| s.running.is_some() || s.terminated.is_some());
            if !started {
                if !matches!(phase(&pod), Phase::Going) {
                    return;
                }
                let version = pod.metadata.resource_version.unwrap_or_default();
                if self.changed(name, &version, 60).await.is_err() {
                    return;
                }
                continue;
            }
            let (ns, pod_name) = self.split(name);
            let Ok(stream) = self.pods(ns).log_stream(pod_name, &params).await else {
                return;
            };
            let mut lines = stream.lines();
            while let Some(Ok(line)) = lines.next().await {
                let (time, text) = match line.split_once(' ') {
                    Some((t, rest)) if chrono::DateTime::parse_from_rfc3339(t).is_ok() => {
                        (t.to_owned(), rest.to_owned())
                    }
                    _ => (chrono::Utc::now().to_rfc3339(), line.clone()),
                };
                let at = chrono::DateTime::parse_from_rfc3339(&time).ok();
                if after.is_some_and(|a| at.is_some_and(|at| at <= a)) {
                    continue; // sent before a restart
                }
                after = at.or(after);
                if sink("stdout", format!("{text}\n"), time).await.is_err() {
                    tracing::warn!("log chunk not recorded");
                }
            }
            // The stream ends with the container, or when the API server
            // cuts it: then it goes on after the last line sent.
            match self.status(name).await {
                Ok(Some(p)) if matches!(phase(&p), Phase::Going) => {}
                _ => return,
            }
        }
    }

    async fn ours(&self) -> Result<Vec<Adopted>, AgentError> {
        let params = ListParams::default().labels(&format!("{LABEL_NODE}={}", self.node));
        let mut items = Vec::new();
        for ns in self.settings.namespaces() {
            items.extend(self.pods(ns).list(&params).await?.items);
        }
        Ok(items
            .into_iter()
            .filter_map(|p| {
                let name = format!("{}/{}", p.metadata.namespace?, p.metadata.name?);
                let mut all: HashMap<String, String> = p
                    .metadata
                    .annotations
                    .unwrap_or_default()
                    .into_iter()
                    .collect();
                all.extend(p.metadata.labels.unwrap_or_default());
                Adopted::from_labels(&self.node, name, &all)
            })
            .collect())
    }

    async fn address(&self, name: &str) -> Option<std::net::IpAddr> {
        self.status(name).await.ok()??.status?.pod_ip?.parse().ok()
    }

    async fn image_id(&self, image: &str) -> String {
        // The cluster pulls it; the reference the owner named is the record.
        image.to_owned()
    }

    async fn version(&self) -> Option<String> {
        let v = self.client.apiserver_version().await.ok()?;
        Some(format!("kubernetes {}", v.git_version))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ud_schemas::dispatch::DispatchRun;
    use ud_schemas::TaskId;

    fn run() -> DispatchRun {
        let mut spec = crate::tests::spec();
        spec.command = vec!["python".into(), "train.py".into()];
        spec.args = vec!["--epochs".into(), "3".into()];
        spec.env = BTreeMap::from([("SEED".into(), "7".into())]);
        spec.resources.cpu_millis = 2500;
        spec.resources.memory_mb = 8192;
        spec.resources.gpus = 2;
        spec.resources.gpu_model = Some("NVIDIA A100".into());
        spec.timeout_seconds = 3600;
        DispatchRun {
            at: 1,
            task_id: TaskId("0190a0b0-0000-7000-8000-000000000001".parse().unwrap()),
            attempt: 2,
            spec,
            gpus: vec!["k8s-gpu-0".into(), "k8s-gpu-1".into()],
            fence_after_seconds: Some(900),
            project: Some("vision".into()),
        }
    }

    fn launch<'a>(run: &'a DispatchRun, secrets: &'a [(String, String)]) -> Launch<'a> {
        Launch {
            image: "registry.example.org/lab/train:1.4",
            run,
            workspace: None,
            shared: None,
            egress_network: "",
            sessions_network: "",
            secrets,
        }
    }

    /// The Pod a GPU task gets, compared with the file beside this module
    /// (`UD_UPDATE_GOLDEN=1` writes it anew).
    #[test]
    fn a_gpu_task_becomes_the_pod_of_the_golden_file() {
        let node = NodeId("0190a0b0-0000-7000-8000-0000000000aa".parse().unwrap());
        let settings = Settings {
            namespace: "lab".into(),
            gpus: 4,
            node_selector: BTreeMap::from([("pool".into(), "gpu".into())]),
            volcano_queue: Some("research".into()),
            ..Settings::default()
        };
        let run = run();
        let secrets = [("API_KEY".to_owned(), "s3cr3t".to_owned())];
        let pod = pod(&node, &settings, &launch(&run, &secrets), 1_700_000_000_000);
        let got = serde_json::to_string_pretty(&pod).unwrap() + "\n";
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/src/k8s/gpu-pod.golden.json");
        if std::env::var_os("UD_UPDATE_GOLDEN").is_some() {
            std::fs::write(path, &got).unwrap();
        }
        let want = std::fs::read_to_string(path).unwrap();
        assert_eq!(got, want, "the Pod differs from {path}");
        // The secret's value is in its Secret only.
        assert!(!got.contains("s3cr3t"));
        let secret = serde_json::to_string(&secret("lab", "x", &node, &secrets)).unwrap();
        assert!(secret.contains("s3cr3t"));
    }

    #[test]
    fn a_pod_is_read_back_for_adoption_from_its_labels_and_annotations() {
        let node = NodeId::new();
        let run = run();
        let p = pod(&node, &Settings::default(), &launch(&run, &[]), 1234);
        let mut all: HashMap<String, String> = p
            .metadata
            .annotations
            .clone()
            .unwrap()
            .into_iter()
            .collect();
        all.extend(p.metadata.labels.clone().unwrap());
        let back = Adopted::from_labels(&node, "ud-x".into(), &all).unwrap();
        assert_eq!((back.task, back.attempt), (run.task_id, 2));
        assert_eq!(back.timeout_seconds, Some(3600));
        assert_eq!(back.started_at, 1234);
        assert_eq!(back.gpus, run.gpus);
        assert_eq!(back.fence_after_seconds, Some(900));
        assert!(Adopted::from_labels(&NodeId::new(), "ud-x".into(), &all).is_none());
    }

    #[test]
    fn files_without_a_claim_ports_and_egress_are_refused_with_the_reason() {
        let mut run = run();
        let none = Settings::default();
        assert_eq!(unsupported(&none, &launch(&run, &[])), None);
        run.spec.outputs = vec!["out/".into()];
        let why = unsupported(&none, &launch(&run, &[])).unwrap();
        assert!(why.contains("UD_K8S_WORKSPACE_CLAIM"), "{why}");
        let claim = Settings {
            workspace_claim: Some(WorkspaceClaim {
                name: "unidesk-work".into(),
                mounted_at: "/var/lib/unidesk-edge".into(),
            }),
            ..Settings::default()
        };
        let inside = PathBuf::from("/var/lib/unidesk-edge/tasks/t-1");
        let outside = PathBuf::from("/tmp/t-1");
        fn with<'a>(run: &'a DispatchRun, w: &'a Path) -> Launch<'a> {
            Launch {
                workspace: Some(w),
                ..launch(run, &[])
            }
        }
        assert_eq!(unsupported(&claim, &with(&run, &inside)), None);
        assert!(unsupported(&claim, &with(&run, &outside))
            .unwrap()
            .contains("not below"));
        run.spec.outputs.clear();
        run.spec.ports = vec![8888];
        assert!(unsupported(&none, &launch(&run, &[]))
            .unwrap()
            .contains("ports"));
    }

    #[test]
    fn a_unidesk_queue_may_have_a_volcano_queue_of_its_own() {
        let mut run = run();
        run.spec.queue = "urgent".into();
        let mut settings = Settings::default();
        let queue = |s: &Settings| {
            let p = pod(&NodeId::new(), s, &launch(&run, &[]), 1);
            let q = p
                .metadata
                .annotations
                .unwrap_or_default()
                .get("scheduling.volcano.sh/queue-name")
                .cloned();
            (q, p.spec.unwrap_or_default().scheduler_name)
        };
        assert_eq!(queue(&settings), (None, None));
        settings.volcano_queue = Some("research".into());
        assert_eq!(
            queue(&settings),
            (Some("research".into()), Some("volcano".into()))
        );
        settings
            .volcano_queues
            .insert("urgent".into(), "deadline".into());
        assert_eq!(
            queue(&settings),
            (Some("deadline".into()), Some("volcano".into()))
        );
    }

    #[test]
    fn a_projects_runs_go_to_its_own_namespace_when_it_has_one() {
        let run = run();
        let mut settings = Settings {
            namespace: "unidesk".into(),
            ..Settings::default()
        };
        let ns = |s: &Settings| {
            pod(&NodeId::new(), s, &launch(&run, &[]), 1)
                .metadata
                .namespace
        };
        assert_eq!(ns(&settings).as_deref(), Some("unidesk"));
        settings
            .project_namespaces
            .insert("vision".into(), "unidesk-vision".into());
        assert_eq!(ns(&settings).as_deref(), Some("unidesk-vision"));
        assert_eq!(settings.namespaces(), vec!["unidesk", "unidesk-vision"]);
    }

    #[test]
    fn a_run_with_files_mounts_its_directories_from_the_claim() {
        let mut run = run();
        run.spec.outputs = vec!["out/".into()];
        let settings = Settings {
            workspace_claim: Some(WorkspaceClaim {
                name: "unidesk-work".into(),
                mounted_at: "/work".into(),
            }),
            ..Settings::default()
        };
        let (w, sh) = (
            PathBuf::from("/work/tasks/t-2"),
            PathBuf::from("/work/tasks/t-2.shared"),
        );
        let l = Launch {
            workspace: Some(&w),
            shared: Some(&sh),
            ..launch(&run, &[])
        };
        let spec = pod(&NodeId::new(), &settings, &l, 1).spec.unwrap();
        let volumes = spec.volumes.unwrap_or_default();
        let files = volumes.iter().find(|v| v.name == "files").unwrap();
        assert_eq!(
            files
                .persistent_volume_claim
                .as_ref()
                .map(|c| c.claim_name.as_str()),
            Some("unidesk-work")
        );
        assert!(volumes.iter().all(|v| v.name != "workspace"));
        let mounts = |c: &Container| -> Vec<(String, Option<String>)> {
            c.volume_mounts
                .iter()
                .flatten()
                .filter(|m| m.name == "files")
                .map(|m| (m.mount_path.clone(), m.sub_path.clone()))
                .collect()
        };
        assert_eq!(
            mounts(&spec.containers[0]),
            vec![
                ("/shared".into(), Some("tasks/t-2.shared".into())),
                ("/workspace".into(), Some("tasks/t-2".into()))
            ]
        );
        // The code is checked out into the same directory.
        let init = spec.init_containers.unwrap_or_default();
        assert_eq!(
            mounts(&init[0]),
            vec![("/workspace".into(), Some("tasks/t-2".into()))]
        );
        assert_eq!(
            spec.containers[0].working_dir.as_deref(),
            Some("/workspace")
        );
    }

    #[test]
    fn a_pods_phase_comes_from_its_task_container_or_says_why_it_failed() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "status": {"phase": "Failed", "containerStatuses": [{
                "name": "task", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 3, "finishedAt": "2026-12-06T10:00:00Z"}}
            }]}
        }))
        .unwrap();
        assert_eq!(phase(&pod), Phase::Ended(3, Some(1_796_551_200_000)));
        let evicted: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "status": {"phase": "Failed", "reason": "Evicted", "message": "low on memory"}
        }))
        .unwrap();
        assert_eq!(phase(&evicted), Phase::Failed("low on memory".into()));
        let checkout: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "status": {"phase": "Pending", "initContainerStatuses": [{
                "name": "code", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 128, "message": "no such commit"}}
            }]}
        }))
        .unwrap();
        assert!(matches!(phase(&checkout), Phase::Failed(m) if m.contains("no such commit")));
        let pending: Pod = serde_json::from_value(
            serde_json::json!({"metadata": {"name": "p"}, "status": {"phase": "Pending"}}),
        )
        .unwrap();
        assert_eq!(phase(&pending), Phase::Going);
    }

    /// The API server's answers as a sequence: a watch that expires (410)
    /// is followed by reading the Pod again; a Pod gone, or made before,
    /// says so.
    #[tokio::test]
    async fn the_api_servers_expired_watches_missing_and_existing_pods_are_handled() {
        use http::{Request, Response};
        use kube::client::Body;
        let (service, mut server) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let settings = Settings {
            namespace: "lab".into(),
            ..Settings::default()
        };
        let pods = Pods::with_client(kube::Client::new(service, "lab"), settings, NodeId::new());
        let pod = |state: serde_json::Value| {
            serde_json::json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "p", "namespace": "lab", "resourceVersion": "5"},
                "status": {"phase": "Running", "containerStatuses": [{"name": "task", "image": "i",
                    "imageID": "", "ready": true, "restartCount": 0, "state": state}]}})
        };
        let status = |code: u16, reason: &str| {
            serde_json::json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                "code": code, "reason": reason, "message": reason})
        };
        let answers = tokio::spawn(async move {
            let mut seen = Vec::new();
            let answer = |seen: &mut Vec<String>, req: Request<Body>, code: u16, body: String| {
                seen.push(format!("{} {}", req.method(), req.uri()));
                Response::builder()
                    .status(code)
                    .body(Body::from(body.into_bytes()))
                    .unwrap()
            };
            let (req, send) = server.next_request().await.unwrap();
            send.send_response(answer(
                &mut seen,
                req,
                200,
                pod(serde_json::json!({"running": {}})).to_string(),
            ));
            let (req, send) = server.next_request().await.unwrap();
            let expired = serde_json::json!({"type": "ERROR", "object": status(410, "Expired")});
            send.send_response(answer(&mut seen, req, 200, format!("{expired}\n")));
            let (req, send) = server.next_request().await.unwrap();
            let ended = pod(serde_json::json!({"terminated": {"exitCode": 7}}));
            send.send_response(answer(&mut seen, req, 200, ended.to_string()));
            let (req, send) = server.next_request().await.unwrap();
            send.send_response(answer(
                &mut seen,
                req,
                404,
                status(404, "NotFound").to_string(),
            ));
            let (req, send) = server.next_request().await.unwrap();
            send.send_response(answer(
                &mut seen,
                req,
                409,
                status(409, "AlreadyExists").to_string(),
            ));
            seen
        });
        assert_eq!(pods.wait("p").await.unwrap(), 7);
        assert!(matches!(
            pods.wait("q").await,
            Err(AgentError::NoExitStatus(_))
        ));
        let run = run();
        let made = pods.create(&launch(&run, &[])).await;
        assert!(
            matches!(&made, Err(AgentError::Refused(m)) if m.contains("exists already")),
            "{made:?}"
        );
        let seen = answers.await.unwrap();
        assert!(
            seen[0].starts_with("GET /api/v1/namespaces/lab/pods/p"),
            "{seen:?}"
        );
        assert!(
            seen[1].contains("watch=true") && seen[1].contains("resourceVersion=5"),
            "{seen:?}"
        );
        assert!(
            seen[4].starts_with("POST /api/v1/namespaces/lab/pods"),
            "{seen:?}"
        );
    }
}
