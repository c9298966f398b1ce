//! The compute-node agent. It talks only to its local leaf nats-server:
//! events go into the node's own stream (kept while the uplink is down, then
//! sourced by the hub), dispatches are pulled from the hub through the leaf.

pub mod docker;
pub mod env;
pub mod hub;
pub mod info;
pub mod transfer;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{oneshot, Mutex};
use tracing::{info, warn, Instrument};
use ud_schemas::codec::{self, EventMeta};
use ud_schemas::dispatch::{self, DispatchCancel, DispatchRun};
use ud_schemas::events::*;
use ud_schemas::{edge, now_millis, Event, NodeId, TaskId};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("nats: {0}")]
    Nats(String),
    #[error("docker: {0}")]
    Docker(#[from] bollard::errors::Error),
    #[error(transparent)]
    Codec(#[from] ud_schemas::CodecError),
}

fn nats(e: impl std::fmt::Display) -> AgentError {
    AgentError::Nats(e.to_string())
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Client URL of the local leaf server, with the agent's credentials.
    pub leaf_url: String,
    pub node_id: NodeId,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub heartbeat_interval: Duration,
    /// Run every task in this image instead of building its environment
    /// from the env repository (nodes without access to repositories).
    pub image: Option<String>,
    /// Git cache, build contexts and task workspaces.
    pub work_dir: std::path::PathBuf,
    /// Longest an environment build may take.
    pub build_timeout: Duration,
    /// Below this much free space in `work_dir` the node says so and takes no new tasks.
    pub min_free_disk_mb: u64,
    /// Environment images and repository mirrors above this are evicted, least recently used first.
    pub cache_limit_mb: u64,
    /// Docker socket (default: the local engine).
    pub docker_host: Option<String>,
}

/// Exponential backoff with full jitter, capped at 30 s.
pub fn reconnect_delay(attempt: usize) -> Duration {
    let cap = 30_000u64;
    let exp = 100u64.saturating_mul(1u64 << attempt.min(16)).min(cap);
    Duration::from_millis(rand::random::<u64>() % (exp + 1))
}

/// Publishes events into the node's own stream, on `ud.edge.<node>.…`.
#[derive(Clone)]
pub struct Reporter {
    node: NodeId,
    local: jetstream::Context,
}

impl Reporter {
    /// Reports into `local`, the node's own JetStream (its leaf server).
    pub fn new(node: NodeId, local: jetstream::Context) -> Self {
        Self { node, local }
    }

    pub async fn send(&self, event: &Event) -> Result<(), AgentError> {
        let (headers, payload) =
            codec::encode_message(event, &EventMeta::new(format!("node:{}", self.node)))?;
        let subject =
            edge::edge_subject(&self.node, &event.subject()).ok_or_else(|| nats("bad subject"))?;
        self.local
            .publish_with_headers(subject, headers, Bytes::from(payload))
            .await
            .map_err(nats)?
            .await
            .map_err(nats)?;
        Ok(())
    }

    /// Records that a preparing step began.
    pub async fn step(&self, task: TaskId, attempt: u32, name: &str) {
        let e = TaskPreparing {
            at: now_millis(),
            node_id: self.node,
            attempt,
            step: name.to_owned(),
        };
        if let Err(e) = self.send(&Event::Task(task, TaskEvent::Preparing(e))).await {
            warn!(error = %e, step = name, "cannot record a preparing step");
        }
    }

    pub async fn log(
        &self,
        task: TaskId,
        attempt: u32,
        stream: &str,
        text: String,
    ) -> Result<(), AgentError> {
        let chunk = dispatch::LogChunk {
            at: now_millis(),
            attempt,
            stream: stream.to_owned(),
            text,
        };
        let subject = format!("ud.edge.{}.log.{task}", self.node);
        self.local
            .publish(subject, Bytes::from(dispatch::to_cbor(&chunk)?))
            .await
            .map_err(nats)?
            .await
            .map_err(nats)?;
        Ok(())
    }
}

/// Creates the node's own stream and the consumer the hub sources it through.
pub async fn ensure_local(local: &jetstream::Context, node: &NodeId) -> Result<(), AgentError> {
    local
        .get_or_create_stream(stream::Config {
            name: edge::stream(node),
            subjects: vec![edge::stream_subjects(node)],
            storage: stream::StorageType::File,
            max_age: Duration::from_secs(7 * 24 * 3600),
            ..Default::default()
        })
        .await
        .map_err(nats)?;
    // The node owns the consumer the hub sources through, so that sourcing
    // resumes within seconds after the link returns.
    let s = local.get_stream(edge::stream(node)).await.map_err(nats)?;
    s.get_or_create_consumer(
        edge::SOURCE_CONSUMER,
        consumer::push::Config {
            durable_name: Some(edge::SOURCE_CONSUMER.into()),
            deliver_subject: edge::deliver_subject(node),
            ack_policy: consumer::AckPolicy::FlowControl,
            flow_control: true,
            idle_heartbeat: Duration::from_secs(1),
            max_ack_pending: 10_000,
            ..Default::default()
        },
    )
    .await
    .map_err(nats)?;
    Ok(())
}

type Running = Arc<Mutex<HashMap<TaskId, oneshot::Sender<DispatchCancel>>>>;

/// Runs the agent until the process is stopped.
pub async fn run(cfg: AgentConfig) -> Result<(), AgentError> {
    let node = cfg.node_id;
    let addr: async_nats::ServerAddr = cfg.leaf_url.parse().map_err(|e: std::io::Error| nats(e))?;
    let options = match (addr.username(), addr.password()) {
        (Some(u), Some(p)) => {
            async_nats::ConnectOptions::with_user_and_password(u.to_owned(), p.to_owned())
        }
        _ => async_nats::ConnectOptions::new(),
    };
    let client = options
        .name(format!("unidesk-edge-{}", cfg.name))
        .custom_inbox_prefix(edge::inbox_prefix(&node))
        .retry_on_initial_connect()
        .reconnect_delay_callback(reconnect_delay)
        .connect(addr)
        .await
        .map_err(nats)?;
    let local = jetstream::with_domain(client.clone(), edge::domain(&node));
    let hub = jetstream::with_domain(client.clone(), edge::HUB_DOMAIN);
    ensure_local(&local, &node).await?;
    let reporter = Reporter { node, local };
    let docker = docker::Executor::connect(cfg.docker_host.as_deref(), node).await?;
    let running: Running = Arc::default();
    let requests = hub::Hub {
        client: client.clone(),
        node,
    };
    let transfers = transfer::Transfers::new(requests.clone());
    let versions = env::Versions::new(
        cfg.work_dir.clone(),
        docker.client(),
        cfg.build_timeout,
        cfg.cache_limit_mb.saturating_mul(1024 * 1024),
    )
    .with_credentials(requests.clone());
    // Everything the agent starts ends with it.
    let mut tasks = tokio::task::JoinSet::new();

    let resources = info::detect(docker.version().await).await;
    reporter
        .send(&Event::Node(
            node,
            NodeEvent::Registered(NodeRegistered {
                at: now_millis(),
                name: cfg.name.clone(),
                labels: cfg.labels.clone(),
                resources,
            }),
        ))
        .await?;
    info!(node_id = %node, "registered");

    // Containers from before a restart: adopted, never run twice.
    for (task, attempt, container) in docker.ours().await? {
        let (tx, rx) = oneshot::channel();
        running.lock().await.insert(task, tx);
        let run = Run {
            docker: docker.clone(),
            reporter: reporter.clone(),
            running: running.clone(),
            task,
            attempt,
        };
        tasks.spawn(supervise(run, container, None, None, rx));
    }

    let beat_reporter = reporter.clone();
    let beat_running = running.clone();
    let interval = cfg.heartbeat_interval;
    let (work_dir, min_free) = (cfg.work_dir.clone(), cfg.min_free_disk_mb);
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            let n = u32::try_from(beat_running.lock().await.len()).unwrap_or(u32::MAX);
            let dir = work_dir.clone();
            let free = tokio::task::spawn_blocking(move || {
                let _ = std::fs::create_dir_all(&dir);
                info::disk_free_mb(&dir)
            })
            .await
            .ok()
            .flatten();
            let low_disk = free.is_some_and(|f| f < min_free);
            let beat = Event::Node(
                node,
                NodeEvent::Heartbeat(NodeHeartbeat {
                    at: now_millis(),
                    running_tasks: n,
                    disk_free_mb: free,
                    low_disk,
                }),
            );
            if let Err(e) = beat_reporter.send(&beat).await {
                warn!(error = %e, "heartbeat not recorded");
            }
        }
    });

    loop {
        // Re-bind after any failure: leaf links have been seen to lose interest after a reset.
        let ctx = Ctx {
            cfg: &cfg,
            docker: &docker,
            versions: &versions,
            reporter: &reporter,
            running: &running,
            requests: &requests,
            transfers: &transfers,
        };
        match pull_dispatches(&hub, &ctx, &mut tasks).await {
            Ok(()) => {}
            Err(e) => warn!(error = %e, "dispatch consumer lost; binding again"),
        }
        tokio::time::sleep(reconnect_delay(3)).await;
    }
}

/// What handling a dispatch needs.
struct Ctx<'a> {
    cfg: &'a AgentConfig,
    docker: &'a docker::Executor,
    versions: &'a env::Versions,
    reporter: &'a Reporter,
    running: &'a Running,
    requests: &'a hub::Hub,
    transfers: &'a transfer::Transfers,
}

async fn pull_dispatches(
    hub: &jetstream::Context,
    ctx: &Ctx<'_>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<(), AgentError> {
    let node = ctx.cfg.node_id;
    let consumer: consumer::PullConsumer = hub
        .get_consumer_from_stream(edge::dispatch_consumer(&node), edge::DISPATCH)
        .await
        .map_err(nats)?;
    let mut messages = consumer.messages().await.map_err(nats)?;
    while let Some(m) = messages.next().await {
        let m = m.map_err(nats)?;
        let kind = m.subject.rsplit('.').next().unwrap_or_default().to_owned();
        match kind.as_str() {
            "run" => match dispatch::from_cbor::<DispatchRun>(&m.payload, "dispatch-run") {
                Ok(run) => start(ctx, run, tasks).await,
                Err(e) => warn!(subject = %m.subject, error = %e, "undecodable dispatch dropped"),
            },
            "cancel" => {
                match dispatch::from_cbor::<DispatchCancel>(&m.payload, "dispatch-cancel") {
                    Ok(c) => {
                        let tx = ctx.running.lock().await.remove(&c.task_id);
                        match tx {
                            Some(tx) => {
                                let _ = tx.send(c);
                            }
                            // Nothing runs here (a run refused as stale, or one that never came): done.
                            None => {
                                let cancelled = Event::Task(
                                    c.task_id,
                                    TaskEvent::Cancelled(TaskCancelled {
                                        at: now_millis(),
                                        reason: c.reason,
                                    }),
                                );
                                if let Err(e) = ctx.reporter.send(&cancelled).await {
                                    warn!(task_id = %c.task_id, error = %e, "cannot record a cancel");
                                }
                            }
                        }
                    }
                    Err(e) => warn!(subject = %m.subject, error = %e, "undecodable cancel dropped"),
                }
            }
            other => warn!(kind = other, "unknown dispatch kind dropped"),
        }
        if let Err(e) = m.ack().await {
            warn!(error = %e, "dispatch ack failed");
        }
    }
    Ok(())
}

async fn start(ctx: &Ctx<'_>, run: DispatchRun, tasks: &mut tokio::task::JoinSet<()>) {
    let (cfg, running) = (ctx.cfg, ctx.running);
    let task = run.task_id;
    let span =
        tracing::info_span!("task", task_id = %task, node_id = %cfg.node_id, attempt = run.attempt);
    let (tx, mut rx) = oneshot::channel();
    {
        let mut r = running.lock().await;
        // A repeated dispatch of a run this node already has.
        if r.contains_key(&task) {
            return;
        }
        r.insert(task, tx);
    }
    let (docker, versions, reporter, running, requests, transfers, image, node) = (
        ctx.docker.clone(),
        ctx.versions.clone(),
        ctx.reporter.clone(),
        running.clone(),
        ctx.requests.clone(),
        ctx.transfers.clone(),
        cfg.image.clone(),
        cfg.node_id,
    );
    let workspace = cfg
        .work_dir
        .join("tasks")
        .join(format!("{task}-{}", run.attempt));
    // Tasks are prepared and started in parallel; the dispatch loop goes on at once.
    tasks.spawn(
        async move {
            let fail = |reason: String| async {
                running.lock().await.remove(&task);
                let failed = Event::Task(
                    task,
                    TaskEvent::Failed(TaskFailed {
                        at: now_millis(),
                        exit_code: None,
                        reason,
                    }),
                );
                let _ = reporter.send(&failed).await;
            };
            // A dispatch that waited while the node was away may be stale: run
            // it only if it is still the current assignment. Without an answer
            // it runs (store and forward); the hub then refuses a stale start
            // and stops it.
            match requests.assignment(task, run.attempt).await {
                Ok(reply) if !reply.current => {
                    let reason = reply.reason.unwrap_or_default();
                    warn!(reason = %reason, "stale dispatch dropped, not run");
                    running.lock().await.remove(&task);
                    // A cancel that came meanwhile is answered here.
                    if let Ok(c) = rx.try_recv() {
                        let cancelled = Event::Task(
                            task,
                            TaskEvent::Cancelled(TaskCancelled {
                                at: now_millis(),
                                reason: c.reason,
                            }),
                        );
                        let _ = reporter.send(&cancelled).await;
                    }
                    return;
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "assignment not confirmed; running it"),
            }
            let files = !run.spec.inputs.is_empty() || !run.spec.outputs.is_empty();
            // What the run needs from the cache stays there while this lives.
            let mut _in_use = None;
            let (image, mount, mut prepared) = match image {
                Some(image) => {
                    let image_id = docker.image_id(&image).await;
                    // A fixed image gets a workspace only to exchange files through.
                    let mount = files.then(|| workspace.clone());
                    if let Some(w) = &mount {
                        if let Err(e) = std::fs::create_dir_all(w) {
                            return fail(format!("preparing the workspace: {e}")).await;
                        }
                    }
                    (image, mount, (String::new(), image_id, Vec::new()))
                }
                None => {
                    let log = |text: String| {
                        let reporter = reporter.clone();
                        async move {
                            let _ = reporter.log(task, run.attempt, "build", text).await;
                        }
                    };
                    let step = |name: &'static str| {
                        let reporter = reporter.clone();
                        async move { reporter.step(task, run.attempt, name).await }
                    };
                    match versions
                        .prepare(task, &run.spec, &workspace, log, step)
                        .await
                    {
                        Ok(p) => {
                            // Make room by what was used least recently (what runs use stays).
                            versions.evict().await;
                            _in_use = Some(p.in_use);
                            (
                                p.image,
                                Some(p.workspace),
                                (p.dockerfile_digest, p.image_id, p.steps),
                            )
                        }
                        Err(e) => {
                            let _ = std::fs::remove_dir_all(&workspace);
                            return fail(e.to_string()).await;
                        }
                    }
                }
            };
            if let (Some(w), false) = (&mount, run.spec.inputs.is_empty()) {
                reporter.step(task, run.attempt, "fetch_inputs").await;
                let t = std::time::Instant::now();
                match transfers.inputs(task, run.attempt, w).await {
                    Ok(bytes) => info!(
                        bytes,
                        millis = t.elapsed().as_millis() as u64,
                        "inputs copied"
                    ),
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&workspace);
                        return fail(format!("fetching inputs: {e}")).await;
                    }
                }
                prepared.2.push(("fetch_inputs", t.elapsed()));
            }
            if mount.is_some() {
                reporter.step(task, run.attempt, "start").await;
            }
            let t = std::time::Instant::now();
            let container = match docker.create(&image, &run, mount.as_deref()).await {
                Ok(c) => c,
                Err(e) => return fail(format!("cannot start container: {e}")).await,
            };
            prepared.2.push(("start", t.elapsed()));
            let gpus = if run.spec.resources.gpus > 0 {
                tokio::task::spawn_blocking(info::gpus_in_use)
                    .await
                    .unwrap_or_default()
            } else {
                vec![]
            };
            let record = TaskPrepared {
                at: now_millis(),
                node_id: node,
                attempt: run.attempt,
                code_commit_id: run.spec.code_commit_id.clone(),
                env_commit_id: run.spec.env_commit_id.clone(),
                dockerfile_digest: prepared.0,
                image_id: prepared.1,
                steps: prepared
                    .2
                    .iter()
                    .map(|(name, d)| PrepareStep {
                        name: (*name).to_owned(),
                        millis: u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
                    })
                    .collect(),
                gpus,
            };
            if let Err(e) = reporter
                .send(&Event::Task(task, TaskEvent::Prepared(record)))
                .await
            {
                warn!(error = %e, "cannot record what the run uses");
            }
            let started = Event::Task(
                task,
                TaskEvent::Started(TaskStarted {
                    at: now_millis(),
                    node_id: node,
                    attempt: run.attempt,
                }),
            );
            if let Err(e) = reporter.send(&started).await {
                warn!(error = %e, "cannot record start");
            }
            let timeout = Duration::from_secs(run.spec.timeout_seconds);
            let outputs = match (&mount, run.spec.outputs.is_empty()) {
                (Some(w), false) => Some(Outputs {
                    transfers,
                    workspace: w.clone(),
                    paths: run.spec.outputs.clone(),
                }),
                _ => None,
            };
            let r = Run {
                docker,
                reporter,
                running,
                task,
                attempt: run.attempt,
            };
            supervise(r, container, Some(timeout), outputs, rx).await;
            if mount.is_some() {
                let _ = std::fs::remove_dir_all(&workspace);
            }
        }
        .instrument(span),
    );
}

/// One run on this node.
struct Run {
    docker: docker::Executor,
    reporter: Reporter,
    running: Running,
    task: TaskId,
    attempt: u32,
}

/// What a run leaves in the object store when it ends.
struct Outputs {
    transfers: transfer::Transfers,
    workspace: std::path::PathBuf,
    paths: Vec<String>,
}

/// Stores a finished run's outputs and records them; the outcome changes to
/// a failure when a succeeded run's outputs cannot be stored, so that no task
/// is marked succeeded while its outputs are missing.
async fn store_outputs(run: &Run, outputs: &Outputs, outcome: TaskEvent) -> TaskEvent {
    let (required, keep) = match &outcome {
        TaskEvent::Succeeded(_) => (true, true),
        // Logs and partial results of failed runs are kept too.
        TaskEvent::Failed(_) | TaskEvent::TimedOut(_) => (false, true),
        _ => (false, false),
    };
    if !keep {
        return outcome;
    }
    let t = std::time::Instant::now();
    match outputs
        .transfers
        .outputs(
            run.task,
            run.attempt,
            &outputs.workspace,
            &outputs.paths,
            required,
        )
        .await
    {
        Ok(files) if files.is_empty() => outcome,
        Ok(files) => {
            let bytes: u64 = files.iter().map(|f| f.size).sum();
            info!(
                files = files.len(),
                bytes,
                millis = t.elapsed().as_millis() as u64,
                "outputs stored"
            );
            let record = TaskOutputs {
                at: now_millis(),
                node_id: run.reporter.node,
                attempt: run.attempt,
                files,
            };
            match run
                .reporter
                .send(&Event::Task(run.task, TaskEvent::Outputs(record)))
                .await
            {
                Ok(()) => outcome,
                Err(e) => TaskEvent::Failed(TaskFailed {
                    at: now_millis(),
                    exit_code: None,
                    reason: format!("cannot record the outputs: {e}"),
                }),
            }
        }
        Err(e) => {
            warn!(error = %e, "outputs not stored");
            match outcome {
                TaskEvent::Succeeded(s) => TaskEvent::Failed(TaskFailed {
                    at: now_millis(),
                    exit_code: Some(s.exit_code),
                    reason: format!("storing outputs: {e}"),
                }),
                TaskEvent::Failed(f) => TaskEvent::Failed(TaskFailed {
                    reason: format!("{}; outputs not stored: {e}", f.reason),
                    ..f
                }),
                other => other,
            }
        }
    }
}

async fn supervise(
    run: Run,
    container: String,
    timeout: Option<Duration>,
    outputs: Option<Outputs>,
    cancel: oneshot::Receiver<DispatchCancel>,
) {
    let (docker, reporter, task, attempt) = (
        run.docker.clone(),
        run.reporter.clone(),
        run.task,
        run.attempt,
    );
    let logs = tokio::spawn({
        let (docker, reporter, container) = (docker.clone(), reporter.clone(), container.clone());
        async move {
            docker
                .follow_logs(&container, |stream, text| {
                    reporter.log(task, attempt, stream, text)
                })
                .await
        }
    });
    let deadline = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => futures::future::pending().await,
        }
    };
    let outcome = tokio::select! {
        code = docker.wait(&container) => match code {
            Ok(0) => TaskEvent::Succeeded(TaskSucceeded { at: now_millis(), exit_code: 0 }),
            Ok(code) => TaskEvent::Failed(TaskFailed { at: now_millis(), exit_code: Some(code), reason: format!("exited with code {code}") }),
            Err(e) => TaskEvent::Failed(TaskFailed { at: now_millis(), exit_code: None, reason: format!("lost the container: {e}") }),
        },
        c = cancel => {
            let grace = c.as_ref().map_or(10, |c| c.grace_seconds);
            let _ = docker.stop(&container, grace).await;
            TaskEvent::Cancelled(TaskCancelled { at: now_millis(), reason: c.map_or_else(|_| "agent stopping".into(), |c| c.reason) })
        },
        _ = deadline => {
            let _ = docker.stop(&container, 10).await;
            TaskEvent::TimedOut(TaskTimedOut { at: now_millis(), timeout_seconds: timeout.map_or(0, |t| t.as_secs()) })
        },
    };
    let _ = logs.await;
    let outcome = match &outputs {
        Some(o) => store_outputs(&run, o, outcome).await,
        None => outcome,
    };
    run.running.lock().await.remove(&task);
    info!(outcome = outcome.name(), "task finished");
    if let Err(e) = reporter.send(&Event::Task(task, outcome)).await {
        warn!(error = %e, "cannot record the outcome");
    }
    let _ = docker.remove(&container).await;
}
