//! One run on this node: checked to be current, prepared (code, environment
//! image, inputs, the last checkpoint), given its secrets, started in a
//! container, supervised to its outcome (exit, cancel or time limit) while
//! its checkpoint folder is uploaded, its outputs stored and the outcome
//! reported. A run whose container outlived an agent restart is adopted and
//! supervised the same way, its time limit counted from when it started.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::oneshot;
use tracing::{info, warn, Instrument};
use ud_schemas::dispatch::{DispatchCancel, DispatchRun, SecretsReply};
use ud_schemas::events::*;
use ud_schemas::report::RunReport;
use ud_schemas::{now_millis, Millis, TaskId};

use crate::runtime::{Adopted, Launch};
use crate::{env, shared, transfer, Agent};

/// Starts a dispatched run in the background, unless this node has it already.
pub(crate) async fn start(agent: &Agent, run: DispatchRun, tasks: &mut tokio::task::JoinSet<()>) {
    let task = run.task_id;
    let (tx, rx) = oneshot::channel();
    {
        let mut running = agent.running.lock().await;
        // A repeated dispatch of a run this node already has.
        if running.contains_key(&task) {
            return;
        }
        running.insert(task, (run.attempt, tx));
    }
    let span = tracing::info_span!("task", task_id = %task, node_id = %agent.cfg.node_id, attempt = run.attempt);
    // Runs are prepared and started in parallel; the dispatch loop goes on at once.
    tasks.spawn(agent.clone().execute(run, rx).instrument(span));
}

/// Supervises a container found after a restart, as if the agent had never stopped.
pub(crate) async fn adopt(agent: &Agent, adopted: Adopted, tasks: &mut tokio::task::JoinSet<()>) {
    let (tx, rx) = oneshot::channel();
    agent
        .running
        .lock()
        .await
        .insert(adopted.task, (adopted.attempt, tx));
    let span = tracing::info_span!("task", task_id = %adopted.task, node_id = %agent.cfg.node_id, attempt = adopted.attempt);
    info!(parent: &span, container = %adopted.container, "run adopted after a restart");
    let outputs = match (&adopted.workspace, adopted.outputs.is_empty()) {
        (Some(w), false) => Some(Outputs {
            workspace: w.clone(),
            paths: adopted.outputs.clone(),
        }),
        _ => None,
    };
    let activity = agent.reachable.insert(
        adopted.task,
        adopted.container.clone(),
        adopted.ports.clone(),
    );
    let supervised = Supervised {
        task: adopted.task,
        attempt: adopted.attempt,
        container: adopted.container,
        // Counted on the boot clock: a restart across a step of the wall
        // clock neither stretches nor cuts the limit.
        limit: adopted.timeout_seconds.map(|t| {
            let now = now_millis();
            let elapsed = crate::boot::elapsed(
                adopted.started_boot.as_deref(),
                crate::boot::stamp().as_deref(),
                adopted.started_at,
                now,
            );
            Limit::after(t, elapsed, now)
        }),
        outputs,
        checkpoint: Kept::of(adopted.checkpoint.as_ref(), adopted.workspace.as_ref()),
        workspace: adopted.workspace,
        fence: adopted.fence_after_seconds.map(Duration::from_secs),
        // What it started from is read back from beside the folder.
        shared: adopted.shared.map(|dir| {
            let base = shared::Base::read(&dir).unwrap_or_default();
            (dir, base)
        }),
        // Its idle time counts again from the restart.
        idle: adopted
            .idle_timeout_seconds
            .filter(|s| *s > 0)
            .map(|s| (Duration::from_secs(s), activity)),
        logs_after: None,
    };
    let agent = agent.clone();
    let (task, attempt, container) = (adopted.task, adopted.attempt, supervised.container.clone());
    let started_at = adopted.started_at;
    tasks.spawn(
        async move {
            // Made but not started when the agent stopped: started now, as
            // the agent would have done next.
            match agent.runtime.start_if_created(&container).await {
                Ok(true) => info!("its container had not started: started now"),
                Ok(false) => {}
                Err(e) => warn!(error = %e, "cannot start the adopted container"),
            }
            // The start may not have been reported before the restart; said
            // again, it changes nothing.
            let started = RunReport::Started(TaskStarted {
                at: started_at,
                node_id: agent.cfg.node_id,
                attempt,
            });
            if let Err(e) = agent.reporter.run(task, started).await {
                warn!(error = %e, "cannot record start");
            }
            let mut supervised = supervised;
            supervised.logs_after = agent.reporter.log_sent_until(task, attempt).await;
            agent.supervise(supervised, rx).await;
        }
        .instrument(span),
    );
}

/// What a prepared run starts from.
struct PreparedRun {
    image: String,
    image_id: String,
    dockerfile_digest: String,
    /// The task's workspace, mounted at `/workspace` (none for a fixed image
    /// with no files to exchange).
    workspace: Option<PathBuf>,
    /// Steps taken, in order, with their durations.
    steps: Vec<(&'static str, Duration)>,
    /// A pipeline step's `/shared` folder and what it was put together from.
    shared: Option<(PathBuf, shared::Base)>,
    /// Keeps the image and mirrors from eviction while the run lives.
    _in_use: Option<env::InUse>,
}

/// A run's time limit, counted from when its container was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Limit {
    pub seconds: u64,
    /// When it runs out (ms since the epoch), for comparing with the
    /// engine's times.
    pub at: Millis,
    /// When it runs out, on this process's monotonic clock: steps of the
    /// wall clock do not move it.
    pub deadline: tokio::time::Instant,
}

impl Limit {
    /// A limit of `seconds` for a run that has been going `elapsed`, at
    /// wall-clock time `now`.
    pub(crate) fn after(seconds: u64, elapsed: Duration, now: Millis) -> Self {
        let left = Duration::from_secs(seconds).saturating_sub(elapsed);
        Self {
            seconds,
            at: now.saturating_add(i64::try_from(left.as_millis()).unwrap_or(i64::MAX)),
            deadline: tokio::time::Instant::now() + left,
        }
    }
}

/// How long a run stopping on its own gets between the graceful signal and
/// the kill: 10 s, less for a short fence.
fn fence_stop_grace(fence: Duration) -> Duration {
    (fence / 4).min(Duration::from_secs(10))
}

/// What a run leaves in the object store when it ends.
struct Outputs {
    workspace: PathBuf,
    paths: Vec<String>,
}

/// A checkpoint folder, uploaded while its run goes and when it ends.
struct Kept {
    workspace: PathBuf,
    /// Relative to the workspace.
    folder: String,
    every: Duration,
}

impl Kept {
    fn of(c: Option<&ud_schemas::spec::Checkpoint>, workspace: Option<&PathBuf>) -> Option<Self> {
        let (c, w) = (c?, workspace?);
        Some(Self {
            workspace: w.clone(),
            folder: c.path.clone(),
            every: Duration::from_secs(c.every_seconds.max(1)),
        })
    }
}

/// A started run under supervision.
struct Supervised {
    task: TaskId,
    attempt: u32,
    container: String,
    limit: Option<Limit>,
    outputs: Option<Outputs>,
    checkpoint: Option<Kept>,
    /// Removed when the run is over.
    workspace: Option<PathBuf>,
    /// Cut off from the main server this long, the run stops itself.
    fence: Option<Duration>,
    /// Its `/shared` folder, saved when it ends, and what it started from.
    shared: Option<(PathBuf, shared::Base)>,
    /// A session's idle limit, and the time of its last traffic.
    idle: Option<(Duration, ud_tunnel::Activity)>,
    /// Adopted after a restart: the engine's time of the last log chunk
    /// sent before it, after which its log goes on.
    logs_after: Option<String>,
}

impl Agent {
    async fn execute(self, run: DispatchRun, mut cancel: oneshot::Receiver<DispatchCancel>) {
        let (task, attempt) = (run.task_id, run.attempt);
        if !self.still_current(&run, &mut cancel).await {
            return;
        }
        let workspace = self
            .cfg
            .work_dir
            .join("tasks")
            .join(format!("{task}-{attempt}"));
        let mut prepared = match self.prepare(&run, &workspace).await {
            Ok(p) => p,
            Err(reason) => {
                remove_dir(shared::dir_of(&workspace)).await;
                remove_dir(workspace).await;
                return self.fail(task, attempt, reason).await;
            }
        };
        let secrets = match self.secrets(&run).await {
            Ok(s) => s,
            Err(reason) => {
                if let Some((d, _)) = prepared.shared.take() {
                    remove_dir(d).await;
                }
                if let Some(w) = prepared.workspace.take() {
                    remove_dir(w).await;
                }
                return self.fail(task, attempt, reason).await;
            }
        };
        if prepared.workspace.is_some() {
            self.reporter.step(task, attempt, "start").await;
        }
        // The run's start, as its history says and its limit counts from.
        let (t, started_at) = (std::time::Instant::now(), now_millis());
        let launch = Launch {
            image: &prepared.image,
            run: &run,
            workspace: prepared.workspace.as_deref(),
            shared: prepared.shared.as_ref().map(|(d, _)| d.as_path()),
            egress_network: &self.cfg.egress_network,
            sessions_network: &self.cfg.sessions_network,
            secrets: &secrets,
        };
        let container = match self.runtime.create(&launch).await {
            Ok(c) => c,
            Err(e) => {
                if let Some((d, _)) = prepared.shared.take() {
                    remove_dir(d).await;
                }
                if let Some(w) = prepared.workspace.take() {
                    remove_dir(w).await;
                }
                return self
                    .fail(task, attempt, format!("cannot start container: {e}"))
                    .await;
            }
        };
        let activity = self
            .reachable
            .insert(task, container.clone(), run.spec.ports.clone());
        prepared.steps.push(("start", t.elapsed()));
        self.record_start(&run, &prepared, started_at).await;
        let outputs = match (&prepared.workspace, run.spec.outputs.is_empty()) {
            (Some(w), false) => Some(Outputs {
                workspace: w.clone(),
                paths: run.spec.outputs.clone(),
            }),
            _ => None,
        };
        let supervised = Supervised {
            task,
            attempt,
            container,
            limit: Some(Limit::after(
                run.spec.timeout_seconds,
                t.elapsed(),
                now_millis(),
            )),
            outputs,
            checkpoint: Kept::of(run.spec.checkpoint.as_ref(), prepared.workspace.as_ref()),
            workspace: prepared.workspace.clone(),
            fence: run.fence_after_seconds.map(Duration::from_secs),
            shared: prepared.shared.take(),
            idle: run
                .spec
                .session
                .as_ref()
                .filter(|s| s.idle_timeout_seconds > 0)
                .map(|s| (Duration::from_secs(s.idle_timeout_seconds), activity)),
            logs_after: None,
        };
        self.supervise(supervised, cancel).await;
    }

    /// A dispatch that waited while the node was away may be stale: it runs
    /// only if it is still the current assignment. Without an answer it runs
    /// (store and forward); the hub then refuses a stale start and stops it.
    async fn still_current(
        &self,
        run: &DispatchRun,
        cancel: &mut oneshot::Receiver<DispatchCancel>,
    ) -> bool {
        let task = run.task_id;
        match self.requests.assignment(task, run.attempt).await {
            Ok(reply) if !reply.current => {
                let reason = reply.reason.unwrap_or_default();
                warn!(reason = %reason, "stale dispatch dropped, not run");
                self.running.lock().await.remove(&task);
                // A cancel that came meanwhile is answered here.
                if let Ok(c) = cancel.try_recv() {
                    let cancelled = RunReport::Cancelled(TaskCancelled {
                        at: now_millis(),
                        reason: c.reason,
                    });
                    let _ = self.reporter.outcome(task, run.attempt, cancelled).await;
                }
                false
            }
            Ok(_) => true,
            Err(e) => {
                warn!(error = %e, "assignment not confirmed; running it");
                true
            }
        }
    }

    /// The image the run starts from and its workspace with the code and
    /// inputs in place.
    async fn prepare(
        &self,
        run: &DispatchRun,
        workspace: &std::path::Path,
    ) -> Result<PreparedRun, String> {
        let (task, attempt) = (run.task_id, run.attempt);
        // Docker nodes build or pull the environment (`versions`); a
        // cluster pulls what the task or, failing that, the node names.
        let fixed = match (&run.spec.image, &self.cfg.image, &self.versions) {
            (Some(task_image), _, None) => Some(task_image),
            (None, Some(node_image), _) => Some(node_image),
            _ => None,
        };
        let mut prepared = match fixed {
            Some(image) => {
                let image_id = self.runtime.image_id(image).await;
                // A fixed image gets a workspace only to exchange files through.
                let files = !run.spec.inputs.is_empty()
                    || !run.spec.outputs.is_empty()
                    || run.spec.checkpoint.is_some()
                    || run.spec.shared.is_some();
                if files {
                    tokio::fs::create_dir_all(workspace)
                        .await
                        .map_err(|e| format!("preparing the workspace: {e}"))?;
                }
                PreparedRun {
                    image: image.clone(),
                    image_id,
                    dockerfile_digest: String::new(),
                    workspace: files.then(|| workspace.to_owned()),
                    steps: Vec::new(),
                    shared: None,
                    _in_use: None,
                }
            }
            None => {
                let log = |text: String| {
                    let reporter = self.reporter.clone();
                    async move {
                        let _ = reporter.log(task, attempt, "build", text, None).await;
                    }
                };
                let step = |name: &'static str| {
                    let reporter = self.reporter.clone();
                    async move { reporter.step(task, attempt, name).await }
                };
                let Some(versions) = &self.versions else {
                    return Err("this node runs tasks only in an image the task or the node's owner names, and this task's environment must be built from its env repository".into());
                };
                let p = versions
                    .prepare(task, &run.spec, workspace, log, step)
                    .await
                    .map_err(|e| e.to_string())?;
                // Make room by what was used least recently (what runs use stays).
                versions.evict().await;
                PreparedRun {
                    image: p.image,
                    image_id: p.image_id,
                    dockerfile_digest: p.dockerfile_digest,
                    workspace: Some(p.workspace),
                    steps: p.steps,
                    shared: None,
                    _in_use: Some(p.in_use),
                }
            }
        };
        if let (Some(w), false) = (&prepared.workspace, run.spec.inputs.is_empty()) {
            self.reporter.step(task, attempt, "fetch_inputs").await;
            let t = std::time::Instant::now();
            let bytes = self
                .transfers
                .inputs(task, attempt, w)
                .await
                .map_err(|e| format!("fetching inputs: {e}"))?;
            info!(
                bytes,
                millis = t.elapsed().as_millis() as u64,
                "inputs copied"
            );
            prepared.steps.push(("fetch_inputs", t.elapsed()));
        }
        if let (Some(w), Some(c)) = (&prepared.workspace, &run.spec.checkpoint) {
            self.reporter
                .step(task, attempt, "restore_checkpoint")
                .await;
            let t = std::time::Instant::now();
            let folder = transfer::inside(w, &c.path)?;
            tokio::fs::create_dir_all(&folder)
                .await
                .map_err(|e| format!("preparing the checkpoint folder: {e}"))?;
            let bytes = self
                .transfers
                .restore_checkpoint(task, attempt, w)
                .await
                .map_err(|e| format!("restoring the checkpoint: {e}"))?;
            info!(
                bytes,
                millis = t.elapsed().as_millis() as u64,
                "checkpoint restored"
            );
            prepared.steps.push(("restore_checkpoint", t.elapsed()));
        }
        if let (Some(w), Some(from)) = (&prepared.workspace, &run.spec.shared) {
            self.reporter.step(task, attempt, "fetch_shared").await;
            let t = std::time::Instant::now();
            let dir = shared::dir_of(w);
            let empty = from.from.is_empty();
            let (base, fetched) =
                shared::restore(&self.transfers, &self.shared, task, attempt, &dir, empty)
                    .await
                    .map_err(|e| format!("putting /shared together: {e}"))?;
            if let Err(e) = base.write(&dir) {
                warn!(error = %e, "what /shared started from is not kept for a restart");
            }
            info!(
                fetched,
                millis = t.elapsed().as_millis() as u64,
                "/shared put together"
            );
            prepared.steps.push(("fetch_shared", t.elapsed()));
            prepared.shared = Some((dir, base));
        }
        Ok(prepared)
    }

    /// The values of the project secrets the run gets (none asked: none).
    async fn secrets(&self, run: &DispatchRun) -> Result<Vec<(String, String)>, String> {
        if run.spec.secrets.is_empty() {
            return Ok(Vec::new());
        }
        match self.requests.secrets(run.task_id, run.attempt).await {
            Ok(SecretsReply::Values { values }) => {
                Ok(values.into_iter().map(|v| (v.name, v.value)).collect())
            }
            Ok(SecretsReply::Denied { reason }) => {
                Err(format!("the run's secrets were refused: {reason}"))
            }
            Err(e) => Err(format!("cannot get the run's secrets: {e}")),
        }
    }

    /// Uploads the run's checkpoint folder every period, for as long as it
    /// is polled (the run's supervision drops it when the run ends).
    async fn keep_saving(
        &self,
        s: &Supervised,
        sent: &mut transfer::Sent,
    ) -> std::convert::Infallible {
        let Some(k) = &s.checkpoint else {
            return futures::future::pending().await;
        };
        loop {
            tokio::time::sleep(k.every).await;
            self.save_checkpoint(s, k, sent).await;
        }
    }

    async fn save_checkpoint(&self, s: &Supervised, k: &Kept, sent: &mut transfer::Sent) {
        let t = std::time::Instant::now();
        match self
            .transfers
            .save_checkpoint(s.task, s.attempt, &k.workspace, &k.folder, sent)
            .await
        {
            Ok(0) => {}
            Ok(files) => info!(
                files,
                millis = t.elapsed().as_millis() as u64,
                "checkpoint saved"
            ),
            // Tried again at the next period (and when the run ends).
            Err(e) => warn!(error = %e, "checkpoint not saved"),
        }
    }

    /// Reports what the run really uses, then that it started (`at`: when
    /// its container was made, from which its limit counts).
    async fn record_start(&self, run: &DispatchRun, prepared: &PreparedRun, at: Millis) {
        let (task, attempt, node) = (run.task_id, run.attempt, self.cfg.node_id);
        let gpus = match self.gpus.lock() {
            Ok(found) => crate::info::gpus_in_use(&found, &run.gpus),
            Err(_) => Vec::new(),
        };
        let record = TaskPrepared {
            at: now_millis(),
            node_id: node,
            attempt,
            code_commit_id: run.spec.code_commit_id.clone(),
            env_commit_id: run.spec.env_commit_id.clone(),
            dockerfile_digest: prepared.dockerfile_digest.clone(),
            image_id: prepared.image_id.clone(),
            steps: prepared
                .steps
                .iter()
                .map(|(name, d)| PrepareStep {
                    name: (*name).to_owned(),
                    millis: u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
                })
                .collect(),
            gpus,
        };
        if let Err(e) = self.reporter.run(task, RunReport::Prepared(record)).await {
            warn!(error = %e, "cannot record what the run uses");
        }
        let started = RunReport::Started(TaskStarted {
            at,
            node_id: node,
            attempt,
        });
        if let Err(e) = self.reporter.run(task, started).await {
            warn!(error = %e, "cannot record start");
        }
    }

    /// Reports a run that could not start.
    async fn fail(&self, task: TaskId, attempt: u32, reason: String) {
        self.running.lock().await.remove(&task);
        let failed = RunReport::Failed(TaskFailed {
            at: now_millis(),
            exit_code: None,
            reason,
        });
        if let Err(e) = self.reporter.outcome(task, attempt, failed).await {
            warn!(error = %e, "cannot record the failure");
        }
    }

    /// Resolves when the run must stop on its own: the main server says it
    /// is no longer this node's, or the node has been cut off from the main
    /// server for nearly `fence`, the time after which the platform places
    /// it elsewhere. It stops early enough to be gone before that: one
    /// check, one heartbeat interval (the main server may have heard the
    /// node last up to a heartbeat before the cut), its stop's grace and a
    /// second early.
    async fn fenced(&self, s: &Supervised) -> String {
        let Some(fence) = s.fence else {
            return futures::future::pending().await;
        };
        let every = (fence / 4).clamp(Duration::from_millis(500), Duration::from_secs(15));
        let cut_off = fence
            .saturating_sub(every)
            .saturating_sub(self.cfg.heartbeat_interval)
            .saturating_sub(fence_stop_grace(fence))
            .saturating_sub(Duration::from_secs(1));
        let mut heard = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let asked = tokio::time::Instant::now();
            let answer = tokio::time::timeout(every, self.requests.assignment(s.task, s.attempt))
                .await
                .map_err(|_| "no answer".to_owned())
                .and_then(|r| r);
            match answer {
                Ok(reply) if !reply.current => {
                    return format!(
                        "no longer this node's run: {}",
                        reply.reason.unwrap_or_default()
                    );
                }
                Ok(_) => heard = asked,
                Err(e) if heard.elapsed() >= cut_off => {
                    return format!(
                        "cut off from the main server for {} s ({e}); the platform places the task elsewhere",
                        heard.elapsed().as_secs()
                    );
                }
                Err(_) => {}
            }
        }
    }

    /// Follows a started run to its outcome: its exit, a cancel or its time
    /// limit; stores its outputs and reports the outcome.
    async fn supervise(self, s: Supervised, cancel: oneshot::Receiver<DispatchCancel>) {
        let (task, attempt) = (s.task, s.attempt);
        // Ends with the supervision: an agent stopped mid-run leaves no
        // follower behind to send the run's lines a second time.
        let logs = tokio_util::task::AbortOnDropHandle::new(tokio::spawn({
            let (runtime, reporter, container, after) = (
                self.runtime.clone(),
                self.reporter.clone(),
                s.container.clone(),
                s.logs_after.clone(),
            );
            async move {
                let sink: crate::runtime::LogSink = Box::new(move |stream, text, time| {
                    let reporter = reporter.clone();
                    Box::pin(
                        async move { reporter.log(task, attempt, stream, text, Some(&time)).await },
                    )
                });
                runtime
                    .follow_logs(&container, after.as_deref(), sink)
                    .await
            }
        }));
        let deadline = async {
            match s.limit {
                Some(limit) => tokio::time::sleep_until(limit.deadline).await,
                None => futures::future::pending().await,
            }
        };
        let timed_out = |limit: Option<Limit>| {
            RunReport::TimedOut(TaskTimedOut {
                at: now_millis(),
                timeout_seconds: limit.map_or(0, |l| l.seconds),
            })
        };
        let idle = async {
            match &s.idle {
                Some((limit, activity)) => loop {
                    let last = activity.load(std::sync::atomic::Ordering::Relaxed);
                    let quiet =
                        Duration::from_millis(u64::try_from(now_millis() - last).unwrap_or(0));
                    if quiet >= *limit {
                        break *limit;
                    }
                    tokio::time::sleep(*limit - quiet).await;
                },
                None => futures::future::pending().await,
            }
        };
        let mut sent = transfer::Sent::default();
        let outcome = {
            let saving = self.keep_saving(&s, &mut sent);
            tokio::pin!(saving);
            let fenced = self.fenced(&s);
            tokio::pin!(fenced);
            tokio::select! {
                never = &mut saving => match never {},
                reason = &mut fenced => {
                    warn!(reason = %reason, "stopping the run on its own");
                    let grace = s.fence.map_or(10, |f| fence_stop_grace(f).as_secs());
                    let _ = self.runtime.stop(&s.container, u32::try_from(grace).unwrap_or(10)).await;
                    // As a stop the main server asks for (which may come too).
                    RunReport::Cancelled(TaskCancelled { at: now_millis(), reason })
                },
                code = self.runtime.wait(&s.container) => match code {
                    // A run that ended past its limit (while the agent was away) timed out.
                    Ok(_) if self.ended_past(&s).await => timed_out(s.limit),
                    Ok(0) => RunReport::Succeeded(TaskSucceeded { at: now_millis(), exit_code: 0 }),
                    Ok(code) => RunReport::Failed(TaskFailed { at: now_millis(), exit_code: Some(code), reason: format!("exited with code {code}") }),
                    Err(e) => RunReport::Failed(TaskFailed { at: now_millis(), exit_code: None, reason: format!("lost the container: {e}") }),
                },
                c = cancel => {
                    let grace = c.as_ref().map_or(10, |c| c.grace_seconds);
                    let _ = self.runtime.stop(&s.container, grace).await;
                    RunReport::Cancelled(TaskCancelled { at: now_millis(), reason: c.map_or_else(|_| "agent stopping".into(), |c| c.reason) })
                },
                () = deadline => {
                    let _ = self.runtime.stop(&s.container, 10).await;
                    timed_out(s.limit)
                },
                limit = idle => {
                    let _ = self.runtime.stop(&s.container, 10).await;
                    let reason = format!("ended after {} min without session traffic (idle_timeout_minutes)", limit.as_secs() / 60);
                    info!(reason = %reason, "session idle");
                    RunReport::Cancelled(TaskCancelled { at: now_millis(), reason })
                },
            }
        };
        self.reachable.remove(&task);
        let _ = logs.await;
        // What the run left in its checkpoint folder, whatever its outcome.
        if let Some(k) = &s.checkpoint {
            self.save_checkpoint(&s, k, &mut sent).await;
        }
        let outcome = match &s.shared {
            Some((dir, base)) => self.save_shared(task, attempt, dir, base, outcome).await,
            None => outcome,
        };
        let outcome = match &s.outputs {
            Some(o) => self.store_outputs(task, attempt, o, outcome).await,
            None => outcome,
        };
        self.running.lock().await.remove(&task);
        info!(outcome = outcome.name(), "task finished");
        if let Err(e) = self.reporter.outcome(task, attempt, outcome).await {
            warn!(error = %e, "cannot record the outcome");
        }
        let _ = self.runtime.remove(&s.container).await;
        if let Some((d, _)) = s.shared {
            shared::Base::forget(&d);
            remove_dir(d).await;
        }
        if let Some(w) = s.workspace {
            remove_dir(w).await;
        }
    }

    /// Saves a finished run's `/shared` (not a cancelled one's: its
    /// pipeline goes no further); a succeeded run whose folder cannot be
    /// saved fails, as the steps after it would start from nothing.
    async fn save_shared(
        &self,
        task: TaskId,
        attempt: u32,
        dir: &std::path::Path,
        base: &shared::Base,
        outcome: RunReport,
    ) -> RunReport {
        if !matches!(
            outcome,
            RunReport::Succeeded(_) | RunReport::Failed(_) | RunReport::TimedOut(_)
        ) {
            return outcome;
        }
        let t = std::time::Instant::now();
        match shared::save(&self.transfers, &self.shared, task, attempt, dir, base).await {
            Ok(saved) => {
                info!(
                    files = saved.files,
                    new_bytes = saved.new_bytes,
                    millis = t.elapsed().as_millis() as u64,
                    "/shared saved"
                );
                outcome
            }
            Err(e) => {
                warn!(error = %e, "/shared not saved");
                shared_missing(outcome, &e)
            }
        }
    }

    /// Whether the run's container ended after its time limit.
    async fn ended_past(&self, s: &Supervised) -> bool {
        let Some(limit) = s.limit else { return false };
        self.runtime
            .finished_at(&s.container)
            .await
            .is_some_and(|finished| finished > limit.at)
    }

    /// Stores a finished run's outputs and records them; the outcome changes
    /// to a failure when a succeeded run's outputs cannot be stored, so that
    /// no task is marked succeeded while its outputs are missing.
    async fn store_outputs(
        &self,
        task: TaskId,
        attempt: u32,
        outputs: &Outputs,
        outcome: RunReport,
    ) -> RunReport {
        let (required, keep) = match &outcome {
            RunReport::Succeeded(_) => (true, true),
            // Logs and partial results of failed runs are kept too.
            RunReport::Failed(_) | RunReport::TimedOut(_) => (false, true),
            _ => (false, false),
        };
        if !keep {
            return outcome;
        }
        let t = std::time::Instant::now();
        let stored = self
            .transfers
            .outputs(task, attempt, &outputs.workspace, &outputs.paths, required)
            .await;
        match stored {
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
                    node_id: self.cfg.node_id,
                    attempt,
                    files,
                };
                match self.reporter.run(task, RunReport::Outputs(record)).await {
                    Ok(()) => outcome,
                    Err(e) => RunReport::Failed(TaskFailed {
                        at: now_millis(),
                        exit_code: None,
                        reason: format!("cannot record the outputs: {e}"),
                    }),
                }
            }
            Err(e) => {
                warn!(error = %e, "outputs not stored");
                outputs_missing(outcome, &e)
            }
        }
    }
}

/// The outcome of a run whose outputs could not be stored.
fn outputs_missing(outcome: RunReport, e: &transfer::TransferError) -> RunReport {
    not_stored(outcome, "outputs", e)
}

/// The outcome of a run whose `/shared` could not be saved.
fn shared_missing(outcome: RunReport, e: &transfer::TransferError) -> RunReport {
    not_stored(outcome, "/shared", e)
}

fn not_stored(outcome: RunReport, what: &str, e: &transfer::TransferError) -> RunReport {
    match outcome {
        RunReport::Succeeded(s) => RunReport::Failed(TaskFailed {
            at: now_millis(),
            exit_code: Some(s.exit_code),
            reason: format!("storing {what}: {e}"),
        }),
        RunReport::Failed(f) => RunReport::Failed(TaskFailed {
            reason: format!("{}; {what} not stored: {e}", f.reason),
            ..f
        }),
        other => other,
    }
}

async fn remove_dir(dir: PathBuf) {
    let _ = tokio::fs::remove_dir_all(dir).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_limit_counts_what_is_left_and_never_goes_below_zero() {
        let before = tokio::time::Instant::now();
        let limit = Limit::after(15, Duration::from_secs(10), 100_000);
        assert_eq!(limit.at, 105_000);
        let left = limit.deadline - before;
        assert!(
            left >= Duration::from_secs(5) && left < Duration::from_secs(6),
            "{left:?}"
        );
        // An agent back after the limit ran out stops the run at once.
        let over = Limit::after(15, Duration::from_secs(90), 100_000);
        assert_eq!(over.at, 100_000);
        assert!(over.deadline <= tokio::time::Instant::now());
    }
}
