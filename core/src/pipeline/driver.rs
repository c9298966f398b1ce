//! Runs pipelines: creates the task of every step that starts, cancels the
//! running ones of a cancelled pipeline, and tells a pipeline how its steps'
//! tasks ended.
//!
//! It reads the pipeline stream from its start (pipelines are few next to
//! tasks) and holds the running pipelines; once it has read all there was,
//! it makes sure every running step has its task (a step's task id is in its
//! `steps_started` event, so creating it twice is a no-op) and then acts on
//! each event as it comes. The ends of tasks come from a durable consumer on
//! the task stream's terminal events: an end seen while the driver was away
//! waits in it.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{consumer, AckKind};
use futures::{FutureExt, StreamExt};
use tracing::{info, warn};
use ud_schemas::codec::EventMeta;
use ud_schemas::events::StepOutcome;
use ud_schemas::{streams, Event, PipelineEvent, PipelineId, TaskId};

use super::{Pipeline, PipelineCommand, PipelineStatus, StepState};
use crate::aggregate::{ExecuteError, Retries};
use crate::commands::TaskCommands;
use crate::store::NatsError;
use crate::task::TaskCommand;

use super::commands::PipelineCommands;

/// The durable consumer of task ends.
pub const CONSUMER: &str = "pipeline-steps";
/// The actor of the driver's events.
pub const ACTOR: &str = "unidesk-pipelines";
/// Most pipeline events acted on together.
const BATCH: usize = 4096;
/// Step tasks created at once.
const CREATE_AT_ONCE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("nats: {0}")]
    Nats(#[source] NatsError),
    #[error(transparent)]
    Store(#[from] crate::StoreError),
}

fn nats(e: impl Into<NatsError>) -> DriverError {
    DriverError::Nats(e.into())
}

/// Runs the driver, binding its consumers again after any failure. With
/// `shared` (the platform has an object store), steps get a `/shared` folder.
pub async fn run(
    commands: PipelineCommands,
    tasks: TaskCommands,
    shared: bool,
) -> Result<(), DriverError> {
    use backon::BackoffBuilder;
    let schedule = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .without_max_times();
    let mut delays = schedule.build();
    loop {
        let mut driver = Driver {
            commands: commands.clone(),
            tasks: tasks.clone(),
            pipelines: HashMap::new(),
            running: HashMap::new(),
            shared,
        };
        match driver.drive().await {
            Ok(()) => delays = schedule.build(),
            Err(e) => warn!(error = %e, "pipeline driver interrupted; binding again"),
        }
        tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(10))).await;
    }
}

struct Driver {
    commands: PipelineCommands,
    tasks: TaskCommands,
    /// Pipelines that have not ended.
    pipelines: HashMap<PipelineId, Pipeline>,
    /// The task of every running step.
    running: HashMap<TaskId, (PipelineId, String)>,
    /// Steps get a `/shared` folder.
    shared: bool,
}

fn outcome(event: &str) -> Option<StepOutcome> {
    Some(match event {
        "succeeded" => StepOutcome::Succeeded,
        "failed" => StepOutcome::Failed,
        "timed_out" => StepOutcome::TimedOut,
        "cancelled" => StepOutcome::Cancelled,
        _ => return None,
    })
}

impl Driver {
    async fn drive(&mut self) -> Result<(), DriverError> {
        let js = self.commands.pipelines().store().jetstream().clone();
        let ends: consumer::PullConsumer = js
            .get_stream(streams::TASKS)
            .await
            .map_err(nats)?
            .get_or_create_consumer(
                CONSUMER,
                consumer::pull::Config {
                    durable_name: Some(CONSUMER.into()),
                    filter_subjects: ud_schemas::subjects::task_end_filters(),
                    ack_wait: Duration::from_secs(60),
                    max_ack_pending: 1000,
                    ..Default::default()
                },
            )
            .await
            .map_err(nats)?;
        let history = js
            .get_stream(streams::PIPELINES)
            .await
            .map_err(nats)?
            .create_consumer(consumer::pull::OrderedConfig {
                max_expires: streams::PULL_EXPIRES,
                ..Default::default()
            })
            .await
            .map_err(nats)?;
        let mut pending = history.cached_info().num_pending;
        let mut events = history.messages().await.map_err(nats)?;
        // Everything there was, folded, before acting on anything.
        while pending > 0 {
            let Some(m) = events.next().await else {
                return Err(DriverError::Nats("pipeline stream ended".into()));
            };
            let m = m.map_err(nats)?;
            pending = m.info().map(|i| i.pending).unwrap_or(0);
            if let Some((id, e)) = decode(&m) {
                self.fold(id, &e).await?;
            }
        }
        self.reconcile().await;
        info!(
            pipelines = self.pipelines.len(),
            steps = self.running.len(),
            "pipeline driver caught up"
        );
        let mut ended = streams::pull(&ends).await.map_err(nats)?;
        loop {
            tokio::select! {
                m = events.next() => {
                    let Some(m) = m else { return Err(DriverError::Nats("pipeline stream ended".into())) };
                    let mut batch = vec![m.map_err(nats)?];
                    // What else has come is acted on together: a fan-out's
                    // steps are created at once.
                    while batch.len() < BATCH {
                        match events.next().now_or_never() {
                            Some(Some(m)) => batch.push(m.map_err(nats)?),
                            _ => break,
                        }
                    }
                    let mut starts = Vec::new();
                    let mut cancels = Vec::new();
                    for m in &batch {
                        let Some((id, e)) = decode(m) else { continue };
                        self.fold(id, &e).await?;
                        match e {
                            PipelineEvent::StepsStarted(s) => {
                                starts.extend(s.steps.into_iter().map(|s| (id, s.step, s.task)));
                            }
                            PipelineEvent::CancelRequested(c) => cancels.push((id, c.reason)),
                            _ => {}
                        }
                    }
                    // Created first: a cancel in the same batch then stops them.
                    self.create_all(starts).await;
                    for (id, reason) in cancels {
                        if let Some(p) = self.pipelines.get(&id) {
                            self.cancel_running(p, &reason).await;
                        }
                    }
                }
                m = ended.next() => {
                    let Some(m) = m else { return Err(DriverError::Nats("task consumer ended".into())) };
                    let m = match m {
                        Ok(m) => m,
                        Err(e) => {
                            warn!(error = %e, "task end consumer error");
                            continue;
                        }
                    };
                    let mut parts = m.subject.split('.').skip(2);
                    let task = parts.next().and_then(|t| t.parse::<TaskId>().ok());
                    let end = parts.next().and_then(outcome);
                    let done = match (task, end) {
                        (Some(task), Some(end)) => self.step_ended(task, end).await,
                        _ => true,
                    };
                    let ack = if done {
                        m.ack().await
                    } else {
                        m.ack_with(AckKind::Nak(Some(Duration::from_secs(2)))).await
                    };
                    if let Err(e) = ack {
                        warn!(error = %e, "task end not acknowledged");
                    }
                }
            }
        }
    }

    /// Applies one pipeline event to the pipelines held.
    async fn fold(&mut self, id: PipelineId, e: &PipelineEvent) -> Result<(), DriverError> {
        let state = match (self.pipelines.remove(&id), e) {
            (_, PipelineEvent::Submitted(_)) => super::evolve(None, id, e),
            (Some(p), _) => super::evolve(Some(p), id, e),
            // An ended pipeline run again: read as it is now (this event included).
            (None, _) => self.commands.pipelines().load(&id).await?.map(|(p, _)| p),
        };
        match e {
            PipelineEvent::StepsStarted(e) => {
                for s in &e.steps {
                    self.running.insert(s.task, (id, s.step.clone()));
                }
            }
            PipelineEvent::StepEnded(s) => {
                self.running.remove(&s.task);
            }
            _ => {}
        }
        if let Some(p) = state.filter(|p| p.status == PipelineStatus::Running) {
            self.pipelines.insert(id, p);
        }
        Ok(())
    }

    /// After reading the history: every running step has its task, a
    /// cancelled pipeline none running, and no step waits that could start.
    async fn reconcile(&self) {
        let running = self.pipelines.values().flat_map(|p| {
            p.steps
                .iter()
                .filter(|s| s.state == StepState::Running)
                .filter_map(|s| Some((p.id, s.name.clone(), s.task?)))
        });
        self.create_all(running.collect()).await;
        for p in self.pipelines.values() {
            if p.cancelling {
                self.cancel_running(p, "the pipeline was cancelled").await;
            }
            let advanced = self
                .commands
                .pipelines()
                .execute(
                    p.id,
                    PipelineCommand::Advance,
                    &EventMeta::new(ACTOR),
                    Retries(4),
                    |_| true,
                )
                .await;
            if let Err(e) = advanced {
                warn!(pipeline_id = %p.id, error = %e, "pipeline not advanced");
            }
        }
    }

    /// The task a started step runs: its spec, placed where what it starts
    /// from already is when that node has room.
    async fn step_task(&self, p: &Pipeline, step: &str) -> Option<TaskCommand> {
        let i = p.index_of(step)?;
        let mut spec = p.task_spec(i, self.shared);
        for from in spec.shared.iter().flat_map(|s| s.from.clone()) {
            if let Ok(Some((t, _))) = self.tasks.tasks().current(&from).await {
                if let Some(node) = t
                    .last_node
                    .filter(|n| !spec.resources.preferred_nodes.contains(n))
                {
                    spec.resources.preferred_nodes.push(node);
                }
            }
        }
        Some(TaskCommand::Submit {
            project: p.project.clone(),
            spec,
            idempotency_key: None,
        })
    }

    /// Creates the tasks of started steps, many at once (a task created
    /// before, after a restart, is left as it is).
    async fn create_all(&self, starts: Vec<(PipelineId, String, TaskId)>) {
        let mut commands = Vec::with_capacity(starts.len());
        for (id, step, task) in starts {
            let Some(p) = self.pipelines.get(&id) else {
                continue;
            };
            if let Some(command) = self.step_task(p, &step).await {
                commands.push((id, task, command));
            }
        }
        let repo = self.tasks.tasks().clone();
        futures::stream::iter(commands)
            .map(move |(pipeline, task, command)| {
                let repo = repo.clone();
                async move {
                    let created = repo.create(task, command, &EventMeta::new(ACTOR)).await;
                    match created {
                        Ok(_) => {
                            info!(pipeline_id = %pipeline, task_id = %task, "step task created")
                        }
                        // Created before (a repeat after a restart).
                        Err(ExecuteError::Conflict) => {}
                        Err(e) => warn!(
                            pipeline_id = %pipeline, task_id = %task, error = %e,
                            "step task not created; the driver tries again when it binds again"
                        ),
                    }
                }
            })
            .buffer_unordered(CREATE_AT_ONCE)
            .collect::<()>()
            .await;
    }

    async fn cancel_running(&self, p: &Pipeline, reason: &str) {
        for s in p.steps.iter().filter(|s| s.state == StepState::Running) {
            let Some(task) = s.task else { continue };
            let cancelled = self
                .tasks
                .execute(
                    task,
                    TaskCommand::Cancel {
                        reason: format!("pipeline cancelled: {reason}"),
                    },
                    ACTOR,
                    |_| true,
                )
                .await;
            if let Err(e) = cancelled {
                // An ended task cannot be cancelled: its end is on its way.
                info!(task_id = %task, error = %e, "step task not cancelled");
            }
        }
    }

    /// A task ended: whether what that means was recorded (or it was no step).
    async fn step_ended(&self, task: TaskId, outcome: StepOutcome) -> bool {
        let Some((id, step)) = self.running.get(&task) else {
            return true;
        };
        let command = PipelineCommand::StepEnded {
            step: step.clone(),
            task,
            outcome,
        };
        match self
            .commands
            .pipelines()
            .execute(*id, command, &EventMeta::new(ACTOR), Retries(8), |_| true)
            .await
        {
            Ok(_) => true,
            Err(ExecuteError::Rejected(e)) => {
                warn!(pipeline_id = %id, task_id = %task, error = %e, "step end refused");
                true
            }
            Err(e) => {
                warn!(pipeline_id = %id, task_id = %task, error = %e, "step end not recorded; again soon");
                false
            }
        }
    }
}

fn decode(m: &async_nats::jetstream::Message) -> Option<(PipelineId, PipelineEvent)> {
    match ud_schemas::codec::decode_message(m.subject.as_str(), m.headers.as_ref(), &m.payload) {
        Ok(env) => match env.event {
            Event::Pipeline(id, e) => Some((id, e)),
            _ => None,
        },
        Err(e) => {
            warn!(subject = %m.subject, error = %e, "undecodable pipeline event");
            None
        }
    }
}
