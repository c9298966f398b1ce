//! Pipelines: steps, each a task, that run once the steps they need have
//! ended, as their `when` asks. The aggregate decides which steps start,
//! which are skipped and when the pipeline ends; [`driver`] creates the
//! steps' tasks and tells the pipeline how they ended.
//!
//! A matrix step is kept as submitted and expanded here ([`expand`]): one
//! step per combination of its values, named `name[v1,v2]`. A step that
//! needs a matrix step needs every step of it.

pub mod commands;
pub mod driver;
mod graph;
pub mod shared;
#[cfg(test)]
mod tests;
pub mod validate;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use ud_schemas::events::{
    PipelineCancelRequested, PipelineEnded, PipelineOutcome, PipelineRerun, PipelineStepEnded,
    PipelineStepSkipped, PipelineStepsStarted, PipelineSubmitted, StepOutcome, StepStart,
};
use ud_schemas::spec::{PipelineStep, SharedFolder, StepWhen, TaskInput};
use ud_schemas::{Millis, PipelineEvent, PipelineId, ProjectId, TaskId, TaskSpec};

pub use graph::{expand, Expanded};

/// Most steps a pipeline may have, matrix steps expanded.
pub const MAX_STEPS: usize = 2000;
/// Most steps a pipeline may list.
pub const MAX_LISTED_STEPS: usize = 500;

/// Where one step stands in the pipeline's current run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StepState {
    Waiting,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
    Skipped,
}

impl StepState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
            Self::Cancelled => "cancelled",
            Self::Skipped => "skipped",
        }
    }

    pub fn ended(self) -> bool {
        !matches!(self, Self::Waiting | Self::Running)
    }

    /// It ran and did not succeed.
    pub fn failed(self) -> bool {
        matches!(self, Self::Failed | Self::TimedOut | Self::Cancelled)
    }
}

impl From<StepOutcome> for StepState {
    fn from(o: StepOutcome) -> Self {
        match o {
            StepOutcome::Succeeded => Self::Succeeded,
            StepOutcome::Failed => Self::Failed,
            StepOutcome::TimedOut => Self::TimedOut,
            StepOutcome::Cancelled => Self::Cancelled,
        }
    }
}

/// A step as it runs: one step as listed, or one combination of a matrix step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub name: String,
    /// The listed step it comes from (index into [`Pipeline::listed`]).
    pub listed: usize,
    /// Its matrix values (empty for a plain step).
    pub values: BTreeMap<String, String>,
    /// Steps it needs (indices into [`Pipeline::steps`]).
    pub needs: Vec<usize>,
    pub when: StepWhen,
    pub state: StepState,
    /// Its latest task (kept while it waits for a rerun).
    pub task: Option<TaskId>,
    /// Tasks created for it so far.
    pub runs: u32,
    /// Why it was skipped.
    pub reason: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PipelineStatus {
    Running,
    Ended(PipelineOutcome),
}

impl PipelineStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Ended(o) => o.as_str(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pipeline {
    pub id: PipelineId,
    pub project: ProjectId,
    pub name: Option<String>,
    /// The steps as submitted.
    pub listed: Arc<Vec<PipelineStep>>,
    pub steps: Vec<Step>,
    index: Arc<HashMap<String, usize>>,
    pub status: PipelineStatus,
    /// A cancel was asked for: nothing starts any more.
    pub cancelling: bool,
    pub submitted_at: Millis,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PipelineCommand {
    Submit {
        id: PipelineId,
        project: ProjectId,
        name: Option<String>,
        steps: Vec<PipelineStep>,
        idempotency_key: Option<String>,
    },
    /// A step's task ended (from the task's own events).
    StepEnded {
        step: String,
        task: TaskId,
        outcome: StepOutcome,
    },
    Cancel {
        reason: String,
    },
    /// Runs an ended pipeline again: every step, or one step (a listed
    /// name: all of a matrix step) and every step after it.
    Rerun {
        step: Option<String>,
    },
    /// Starts or skips what can start or be skipped now (nothing, unless an
    /// earlier decision was only partly appended).
    Advance,
}

impl PipelineCommand {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Submit { .. } => "submit",
            Self::StepEnded { .. } => "step_ended",
            Self::Cancel { .. } => "cancel",
            Self::Rerun { .. } => "rerun",
            Self::Advance => "advance",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PipelineError {
    #[error("pipeline not found")]
    NotFound,
    #[error("pipeline already submitted")]
    AlreadySubmitted,
    #[error("the pipeline has ended ({0})")]
    Ended(&'static str),
    #[error("the pipeline is still running; cancel it or wait for its end")]
    StillRunning,
    #[error("the pipeline has no step {0:?}")]
    NoSuchStep(String),
}

/// The task id of a step's `run`-th task: time-ordered like every task id,
/// and the same whoever works it out from the same event.
pub fn step_task_id(pipeline: PipelineId, step: &str, run: u32, now: Millis) -> TaskId {
    let digest = Sha256::digest(format!("{pipeline}\n{step}\n{run}").as_bytes());
    let mut random = [0u8; 10];
    random.copy_from_slice(&digest[..10]);
    let millis = u64::try_from(now).unwrap_or(0);
    TaskId(uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid())
}

impl Pipeline {
    pub fn step(&self, name: &str) -> Option<&Step> {
        self.index.get(name).map(|i| &self.steps[*i])
    }

    /// The index of step `name` in [`Pipeline::steps`].
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// The steps a rerun of `step` (all when `None`) runs again: the named
    /// ones and every step after them.
    pub fn rerun_set(&self, step: Option<&str>) -> Result<Vec<usize>, PipelineError> {
        let Some(name) = step else {
            return Ok((0..self.steps.len()).collect());
        };
        let mut chosen: Vec<bool> = self
            .steps
            .iter()
            .map(|s| s.name == name || self.listed[s.listed].name == name)
            .collect();
        if !chosen.iter().any(|c| *c) {
            return Err(PipelineError::NoSuchStep(name.to_owned()));
        }
        // Downstream: a fixpoint over the graph (it has no cycle).
        loop {
            let mut changed = false;
            for (i, s) in self.steps.iter().enumerate() {
                if !chosen[i] && s.needs.iter().any(|n| chosen[*n]) {
                    chosen[i] = true;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        Ok((0..self.steps.len()).filter(|i| chosen[*i]).collect())
    }

    /// The task step `i` runs: its listed spec with its matrix values put
    /// in, the pipeline named in its environment, inputs naming other
    /// steps' outputs pointed at those steps' latest tasks, and (where the
    /// platform has an object store to keep it in) its `/shared` folder.
    pub fn task_spec(&self, i: usize, shared: bool) -> TaskSpec {
        let step = &self.steps[i];
        let mut spec = graph::expand_spec(&self.listed[step.listed].spec, &step.values);
        spec.name = Some(match &self.name {
            Some(p) => format!("{p}/{}", step.name),
            None => step.name.clone(),
        });
        spec.env
            .insert("UD_PIPELINE_ID".into(), self.id.to_string());
        spec.env
            .insert("UD_PIPELINE_STEP".into(), step.name.clone());
        spec.inputs = spec
            .inputs
            .into_iter()
            .map(|input| match self.resolve(&input.source) {
                Some(source) => TaskInput { source, ..input },
                None => input,
            })
            .collect();
        // `/shared` starts from what the steps it needs left there.
        spec.shared = shared.then(|| SharedFolder {
            from: step
                .needs
                .iter()
                .filter_map(|n| self.steps[*n].task)
                .collect(),
            merge: self.listed[step.listed].merge,
        });
        spec
    }

    /// `step:<name>/<path>` as `task:<id>/<path>` of the step's latest task.
    fn resolve(&self, source: &str) -> Option<String> {
        let (step, path) = graph::step_source(source)?;
        let task = self.step(step)?.task?;
        Some(format!("task:{task}/{path}"))
    }

    /// Why step `i` may not run although its needs have ended, if it may not.
    fn hold(&self, i: usize) -> Option<String> {
        let step = &self.steps[i];
        let needs = step.needs.iter().map(|n| &self.steps[*n]);
        let reason = match step.when {
            StepWhen::OnSuccess => needs
                .clone()
                .find(|n| n.state != StepState::Succeeded)
                .map(|n| format!("step {} {}", n.name, n.state.as_str())),
            StepWhen::OnFailure => (!needs.clone().any(|n| n.state.failed()))
                .then(|| "no step it needs failed".to_owned()),
            StepWhen::Always => None,
        };
        if reason.is_some() {
            return reason;
        }
        // An input from a step that never ran cannot be fetched.
        let spec = &self.listed[step.listed].spec;
        spec.inputs.iter().find_map(|input| {
            let (name, _) = graph::step_source(&input.source)?;
            let name = graph::substitute(name, &step.values);
            match self.step(&name) {
                Some(s) if s.task.is_none() => Some(format!(
                    "its input {} comes from a step that never ran",
                    input.source
                )),
                _ => None,
            }
        })
    }

    fn outcome(&self) -> PipelineOutcome {
        if self.cancelling {
            PipelineOutcome::Cancelled
        } else if self.steps.iter().any(|s| s.state.failed()) {
            PipelineOutcome::Failed
        } else {
            PipelineOutcome::Succeeded
        }
    }
}

/// Starts or skips every waiting step whose needs have ended, until none
/// changes (the steps started in one round are one event), and ends the
/// pipeline when no step waits or runs.
fn advance(mut p: Pipeline, now: Millis, out: &mut Vec<PipelineEvent>) {
    loop {
        let mut next = Vec::new();
        let mut starts = Vec::new();
        for i in 0..p.steps.len() {
            let s = &p.steps[i];
            if s.state != StepState::Waiting {
                continue;
            }
            if p.cancelling {
                next.push(PipelineEvent::StepSkipped(PipelineStepSkipped {
                    at: now,
                    step: s.name.clone(),
                    reason: "the pipeline was cancelled".into(),
                }));
                continue;
            }
            if !s.needs.iter().all(|n| p.steps[*n].state.ended()) {
                continue;
            }
            match p.hold(i) {
                Some(reason) => next.push(PipelineEvent::StepSkipped(PipelineStepSkipped {
                    at: now,
                    step: s.name.clone(),
                    reason,
                })),
                None => starts.push(StepStart {
                    step: s.name.clone(),
                    task: step_task_id(p.id, &s.name, s.runs + 1, now),
                    run: s.runs + 1,
                }),
            }
        }
        if !starts.is_empty() {
            next.push(PipelineEvent::StepsStarted(PipelineStepsStarted {
                at: now,
                steps: starts,
            }));
        }
        if next.is_empty() {
            break;
        }
        for e in next {
            apply(&mut p, &e);
            out.push(e);
        }
    }
    if p.status == PipelineStatus::Running && p.steps.iter().all(|s| s.state.ended()) {
        out.push(PipelineEvent::Ended(PipelineEnded {
            at: now,
            outcome: p.outcome(),
        }));
    }
}

pub fn decide(
    p: Option<&Pipeline>,
    command: PipelineCommand,
    now: Millis,
) -> Result<Vec<PipelineEvent>, PipelineError> {
    let mut out = Vec::new();
    match (p, command) {
        (
            None,
            PipelineCommand::Submit {
                id,
                project,
                name,
                steps,
                idempotency_key,
            },
        ) => {
            let submitted = PipelineEvent::Submitted(PipelineSubmitted {
                at: now,
                project,
                name,
                steps,
                idempotency_key,
            });
            let state = evolve(None, id, &submitted);
            out.push(submitted);
            if let Some(state) = state {
                advance(state, now, &mut out);
            }
        }
        (Some(_), PipelineCommand::Submit { .. }) => return Err(PipelineError::AlreadySubmitted),
        (None, _) => return Err(PipelineError::NotFound),
        (
            Some(p),
            PipelineCommand::StepEnded {
                step,
                task,
                outcome,
            },
        ) => {
            // Only the end of the step's running task counts (a repeat, or a
            // task of an earlier run, changes nothing).
            let running = p
                .step(&step)
                .is_some_and(|s| s.state == StepState::Running && s.task == Some(task));
            if running {
                let ended = PipelineEvent::StepEnded(PipelineStepEnded {
                    at: now,
                    step,
                    task,
                    outcome,
                });
                let mut state = p.clone();
                apply(&mut state, &ended);
                out.push(ended);
                advance(state, now, &mut out);
            }
        }
        (Some(p), PipelineCommand::Cancel { reason }) => match p.status {
            PipelineStatus::Ended(o) => return Err(PipelineError::Ended(o.as_str())),
            PipelineStatus::Running if p.cancelling => {}
            PipelineStatus::Running => {
                let cancel =
                    PipelineEvent::CancelRequested(PipelineCancelRequested { at: now, reason });
                let mut state = p.clone();
                apply(&mut state, &cancel);
                out.push(cancel);
                advance(state, now, &mut out);
            }
        },
        (Some(p), PipelineCommand::Advance) => {
            if p.status == PipelineStatus::Running {
                advance(p.clone(), now, &mut out);
            }
        }
        (Some(p), PipelineCommand::Rerun { step }) => {
            if p.status == PipelineStatus::Running {
                return Err(PipelineError::StillRunning);
            }
            let steps = p
                .rerun_set(step.as_deref())?
                .into_iter()
                .map(|i| p.steps[i].name.clone())
                .collect();
            let rerun = PipelineEvent::Rerun(PipelineRerun { at: now, steps });
            let mut state = p.clone();
            apply(&mut state, &rerun);
            out.push(rerun);
            advance(state, now, &mut out);
        }
    }
    Ok(out)
}

pub fn evolve(p: Option<Pipeline>, id: PipelineId, event: &PipelineEvent) -> Option<Pipeline> {
    if let PipelineEvent::Submitted(e) = event {
        let expanded = expand(&e.steps).unwrap_or_default();
        let index = expanded
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();
        let steps = expanded
            .into_iter()
            .map(|s| Step {
                name: s.name,
                listed: s.listed,
                values: s.values,
                needs: s.needs,
                when: s.when,
                state: StepState::Waiting,
                task: None,
                runs: 0,
                reason: None,
            })
            .collect();
        return Some(Pipeline {
            id,
            project: e.project.clone(),
            name: e.name.clone(),
            listed: Arc::new(e.steps.clone()),
            steps,
            index: Arc::new(index),
            status: PipelineStatus::Running,
            cancelling: false,
            submitted_at: e.at,
        });
    }
    let mut p = p?;
    apply(&mut p, event);
    Some(p)
}

/// Applies an event to a submitted pipeline, in place.
fn apply(p: &mut Pipeline, event: &PipelineEvent) {
    let step_mut = |p: &mut Pipeline, name: &str| -> Option<usize> { p.index.get(name).copied() };
    match event {
        PipelineEvent::Submitted(_) => {}
        PipelineEvent::StepsStarted(e) => {
            for start in &e.steps {
                if let Some(i) = step_mut(p, &start.step) {
                    let s = &mut p.steps[i];
                    s.state = StepState::Running;
                    s.task = Some(start.task);
                    s.runs = start.run;
                    s.reason = None;
                }
            }
        }
        PipelineEvent::StepEnded(e) => {
            if let Some(i) = step_mut(p, &e.step) {
                p.steps[i].state = e.outcome.into();
            }
        }
        PipelineEvent::StepSkipped(e) => {
            if let Some(i) = step_mut(p, &e.step) {
                p.steps[i].state = StepState::Skipped;
                p.steps[i].reason = Some(e.reason.clone());
            }
        }
        PipelineEvent::CancelRequested(_) => p.cancelling = true,
        PipelineEvent::Rerun(e) => {
            p.status = PipelineStatus::Running;
            p.cancelling = false;
            for name in &e.steps {
                if let Some(i) = step_mut(p, name) {
                    p.steps[i].state = StepState::Waiting;
                    p.steps[i].reason = None;
                }
            }
        }
        PipelineEvent::Ended(e) => p.status = PipelineStatus::Ended(e.outcome),
    }
}

impl crate::aggregate::Aggregate for Pipeline {
    type Id = PipelineId;
    type Command = PipelineCommand;
    type Event = PipelineEvent;
    type Error = PipelineError;

    const STREAM: &'static str = ud_schemas::streams::PIPELINES;

    fn scope(id: &PipelineId) -> String {
        ud_schemas::subjects::pipeline_all(id)
    }

    fn wrap(id: PipelineId, event: PipelineEvent) -> ud_schemas::Event {
        ud_schemas::Event::Pipeline(id, event)
    }

    fn unwrap(event: ud_schemas::Event) -> Option<(PipelineId, PipelineEvent)> {
        match event {
            ud_schemas::Event::Pipeline(id, e) => Some((id, e)),
            _ => None,
        }
    }

    fn decide(
        state: Option<&Self>,
        command: PipelineCommand,
        now: Millis,
    ) -> Result<Vec<PipelineEvent>, PipelineError> {
        decide(state, command, now)
    }

    fn evolve(state: Option<Self>, id: PipelineId, event: &PipelineEvent) -> Option<Self> {
        evolve(state, id, event)
    }
}

impl StepState {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "waiting" => Self::Waiting,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "timed_out" => Self::TimedOut,
            "cancelled" => Self::Cancelled,
            "skipped" => Self::Skipped,
            _ => return None,
        })
    }
}

impl PipelineStatus {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => Self::Running,
            "succeeded" => Self::Ended(PipelineOutcome::Succeeded),
            "failed" => Self::Ended(PipelineOutcome::Failed),
            "cancelled" => Self::Ended(PipelineOutcome::Cancelled),
            _ => return None,
        })
    }
}

/// A pipeline as read models keep it: what was submitted, and each step as
/// it runs; [`Pipeline::restore`] makes the aggregate again from it.
impl Pipeline {
    pub fn views(&self) -> Vec<ud_schemas::api::PipelineStepView> {
        self.steps
            .iter()
            .map(|s| ud_schemas::api::PipelineStepView {
                name: s.name.clone(),
                step: self.listed[s.listed].name.clone(),
                values: s.values.clone(),
                needs: s
                    .needs
                    .iter()
                    .map(|n| self.steps[*n].name.clone())
                    .collect(),
                when: s.when,
                state: s.state.as_str().to_owned(),
                task_id: s.task.map(|t| t.to_string()),
                runs: s.runs,
                reason: s.reason.clone(),
            })
            .collect()
    }

    /// The aggregate from what [`Pipeline::views`] and its submission said.
    pub fn restore(
        id: PipelineId,
        submitted: &PipelineSubmitted,
        status: PipelineStatus,
        cancelling: bool,
        views: &[ud_schemas::api::PipelineStepView],
    ) -> Option<Self> {
        let event = PipelineEvent::Submitted(submitted.clone());
        let mut p = evolve(None, id, &event)?;
        for v in views {
            let Some(&i) = p.index.get(&v.name) else {
                continue;
            };
            let s = &mut p.steps[i];
            s.state = StepState::parse(&v.state).unwrap_or(StepState::Waiting);
            s.task = v.task_id.as_deref().and_then(|t| t.parse().ok());
            s.runs = v.runs;
            s.reason = v.reason.clone();
        }
        p.status = status;
        p.cancelling = cancelling;
        Some(p)
    }
}
