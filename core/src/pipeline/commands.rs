//! Pipeline commands as users give them: submit, cancel, rerun.

use tracing::{info, instrument};
use ud_schemas::api::{FieldError, SubmitPipeline};
use ud_schemas::codec::EventMeta;
use ud_schemas::{PipelineId, ProjectId};

use super::{Pipeline, PipelineCommand, PipelineError};
use crate::aggregate::{ExecuteError, Repository, Retries};
use crate::commands::{CommandError, TaskCommands};

/// What an accepted pipeline command did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PipelineAccepted {
    pub pipeline_id: PipelineId,
    /// Stream sequence (`UD_PIPELINES`) of the command's last event.
    pub seq: u64,
    /// False when the command changed nothing (a repeat).
    pub changed: bool,
}

impl From<ExecuteError<PipelineError>> for CommandError {
    fn from(e: ExecuteError<PipelineError>) -> Self {
        match e {
            ExecuteError::Rejected(PipelineError::NotFound) | ExecuteError::Hidden => {
                Self::NoPipeline
            }
            ExecuteError::Rejected(e @ PipelineError::NoSuchStep(_)) => {
                Self::Invalid(vec![FieldError::new("step", e.to_string())])
            }
            ExecuteError::Rejected(e) => Self::PipelineRejected(e),
            ExecuteError::Conflict => Self::Conflict,
            ExecuteError::Store(e) => e.into(),
        }
    }
}

#[derive(Clone)]
pub struct PipelineCommands {
    pipelines: Repository<Pipeline>,
    tasks: TaskCommands,
}

/// Most pipelines a main server remembers.
const RECENT_PIPELINES: u64 = 10_000;

impl PipelineCommands {
    pub fn new(tasks: TaskCommands) -> Self {
        Self {
            pipelines: Repository::cached(tasks.store().clone(), RECENT_PIPELINES, None),
            tasks,
        }
    }

    pub fn pipelines(&self) -> &Repository<Pipeline> {
        &self.pipelines
    }

    #[instrument(skip_all, fields(project = %req.project))]
    pub async fn submit(
        &self,
        req: &SubmitPipeline,
        actor: &str,
        may_use: impl Fn(&ProjectId) -> bool,
    ) -> Result<PipelineAccepted, CommandError> {
        self.submit_as(PipelineId::new(), req, actor, may_use).await
    }

    /// [`PipelineCommands::submit`] under an id the caller chose: a
    /// pipeline with that id already there is a repeat (`changed` false).
    pub async fn submit_as(
        &self,
        id: PipelineId,
        req: &SubmitPipeline,
        actor: &str,
        may_use: impl Fn(&ProjectId) -> bool,
    ) -> Result<PipelineAccepted, CommandError> {
        let (project, name, steps) =
            super::validate::submit_pipeline(req).map_err(CommandError::Invalid)?;
        if !may_use(&project) {
            return Err(CommandError::Forbidden(project.to_string()));
        }
        let mut errors = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            match self.tasks.check_references(&project, &step.spec).await {
                Ok(()) => {}
                Err(CommandError::Invalid(fields)) => {
                    errors.extend(
                        fields
                            .into_iter()
                            .map(|f| FieldError::new(format!("steps[{i}].{}", f.field), f.reason)),
                    );
                }
                Err(other) => return Err(other),
            }
        }
        if !errors.is_empty() {
            return Err(CommandError::Invalid(errors));
        }
        let command = PipelineCommand::Submit {
            id,
            project,
            name,
            steps,
            idempotency_key: None,
        };
        let done = match self
            .pipelines
            .create(id, command, &EventMeta::new(actor))
            .await
        {
            Ok(done) => done,
            Err(ExecuteError::Conflict) => {
                let seq = self.pipelines.current(&id).await?.map_or(0, |(_, seq)| seq);
                return Ok(PipelineAccepted {
                    pipeline_id: id,
                    seq,
                    changed: false,
                });
            }
            Err(e) => return Err(e.into()),
        };
        info!(pipeline_id = %id, events = done.events.len(), "pipeline submitted");
        Ok(PipelineAccepted {
            pipeline_id: id,
            seq: done.seq,
            changed: true,
        })
    }

    /// Runs a command against a pipeline the caller may see.
    #[instrument(skip_all, fields(pipeline_id = %id, command = command.name()))]
    pub async fn execute(
        &self,
        id: PipelineId,
        command: PipelineCommand,
        actor: &str,
        may_see: impl Fn(&ProjectId) -> bool,
    ) -> Result<PipelineAccepted, CommandError> {
        let done = self
            .pipelines
            .execute(id, command, &EventMeta::new(actor), Retries(4), |p| {
                may_see(&p.project)
            })
            .await?;
        Ok(PipelineAccepted {
            pipeline_id: id,
            seq: done.seq,
            changed: !done.events.is_empty(),
        })
    }

    pub async fn cancel(
        &self,
        id: PipelineId,
        reason: &str,
        actor: &str,
        may_see: impl Fn(&ProjectId) -> bool,
    ) -> Result<PipelineAccepted, CommandError> {
        crate::validate::reason("reason", reason).map_err(|f| CommandError::Invalid(vec![f]))?;
        let command = PipelineCommand::Cancel {
            reason: reason.to_owned(),
        };
        self.execute(id, command, actor, may_see).await
    }

    pub async fn rerun(
        &self,
        id: PipelineId,
        step: Option<String>,
        actor: &str,
        may_see: impl Fn(&ProjectId) -> bool,
    ) -> Result<PipelineAccepted, CommandError> {
        self.execute(id, PipelineCommand::Rerun { step }, actor, may_see)
            .await
    }
}
