//! Schedule commands as users give them (create, pause, resume, delete),
//! and the firing of one time.

use tracing::{info, instrument, warn};
use ud_schemas::api::{CreateSchedule, FieldError, SubmitPipeline, SubmitTask};
use ud_schemas::codec::EventMeta;
use ud_schemas::events::ScheduleFired;
use ud_schemas::{Millis, PipelineId, ProjectId, ScheduleId};

use super::{Schedule, ScheduleCommand, ScheduleError};
use crate::aggregate::{ExecuteError, Repository, Retries};
use crate::commands::{CommandError, TaskCommands};
use crate::pipeline::commands::PipelineCommands;

impl From<ExecuteError<ScheduleError>> for CommandError {
    fn from(e: ExecuteError<ScheduleError>) -> Self {
        match e {
            ExecuteError::Rejected(ScheduleError::NotFound) | ExecuteError::Hidden => {
                Self::NoSchedule
            }
            ExecuteError::Rejected(e) => Self::ScheduleRejected(e),
            ExecuteError::Conflict => Self::Conflict,
            ExecuteError::Store(e) => e.into(),
        }
    }
}

/// The actor of the events the runner records.
pub const ACTOR: &str = "unidesk-schedules";

/// What an accepted schedule command did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScheduleAccepted {
    pub schedule_id: ScheduleId,
    /// Stream sequence (`UD_SCHEDULES`) of the command's last event.
    pub seq: u64,
    /// False when the command changed nothing (a repeat).
    pub changed: bool,
}

#[derive(Clone)]
pub struct ScheduleCommands {
    schedules: Repository<Schedule>,
    tasks: TaskCommands,
    pipelines: PipelineCommands,
}

impl ScheduleCommands {
    pub fn new(tasks: TaskCommands, pipelines: PipelineCommands) -> Self {
        Self {
            schedules: Repository::new(tasks.store().clone()),
            tasks,
            pipelines,
        }
    }

    pub fn schedules(&self) -> &Repository<Schedule> {
        &self.schedules
    }

    #[instrument(skip_all, fields(name = %req.name))]
    pub async fn create(
        &self,
        req: &CreateSchedule,
        actor: &str,
        may_use: impl Fn(&ProjectId) -> bool,
    ) -> Result<ScheduleAccepted, CommandError> {
        let (project, created) = super::validate(req).map_err(CommandError::Invalid)?;
        if !may_use(&project) {
            return Err(CommandError::Forbidden(project.to_string()));
        }
        let id = ScheduleId::new();
        let done = self
            .schedules
            .create(
                id,
                ScheduleCommand::Create(Box::new(created)),
                &EventMeta::new(actor),
            )
            .await?;
        info!(schedule_id = %id, "schedule created");
        Ok(ScheduleAccepted {
            schedule_id: id,
            seq: done.seq,
            changed: true,
        })
    }

    /// Runs a command against a schedule the caller may see.
    #[instrument(skip_all, fields(schedule_id = %id, command = command.name()))]
    pub async fn execute(
        &self,
        id: ScheduleId,
        command: ScheduleCommand,
        actor: &str,
        may_see: impl Fn(&ProjectId) -> bool,
    ) -> Result<ScheduleAccepted, CommandError> {
        if let ScheduleCommand::Pause { reason } = &command {
            crate::validate::reason("reason", reason)
                .map_err(|f| CommandError::Invalid(vec![f]))?;
        }
        let done = self
            .schedules
            .execute(id, command, &EventMeta::new(actor), Retries(4), |s| {
                may_see(s.project())
            })
            .await?;
        Ok(ScheduleAccepted {
            schedule_id: id,
            seq: done.seq,
            changed: !done.events.is_empty(),
        })
    }

    /// Submits what `s` submits for the time `due`, under an id of that
    /// time, so a second main server firing it makes no second run; what
    /// the platform no longer accepts is recorded as the firing's error.
    #[instrument(skip_all, fields(schedule_id = %s.id, due))]
    pub async fn submit_for(
        &self,
        s: &Schedule,
        due: Millis,
    ) -> Result<ScheduleFired, CommandError> {
        let actor = format!("schedule:{}", s.id);
        let project = s.project().clone();
        let may_use = |p: &ProjectId| *p == project;
        let mut fired = ScheduleFired {
            at: 0,
            due,
            task_id: None,
            pipeline_id: None,
            error: None,
        };
        let outcome = if let Some(body) = &s.created.task {
            match serde_json::from_value::<SubmitTask>(body.clone()) {
                Ok(req) => {
                    let key = format!("schedule-{}-{due}", s.id);
                    self.tasks
                        .submit(&req, Some(&key), &actor, may_use)
                        .await
                        .map(|a| fired.task_id = Some(a.task_id))
                }
                Err(e) => Err(CommandError::Invalid(vec![FieldError::new(
                    "task",
                    e.to_string(),
                )])),
            }
        } else if let Some(body) = &s.created.pipeline {
            match serde_json::from_value::<SubmitPipeline>(body.clone()) {
                Ok(req) => {
                    let id = PipelineId(derived_id(due, s.id.0.as_bytes()));
                    self.pipelines
                        .submit_as(id, &req, &actor, may_use)
                        .await
                        .map(|a| fired.pipeline_id = Some(a.pipeline_id))
                }
                Err(e) => Err(CommandError::Invalid(vec![FieldError::new(
                    "pipeline",
                    e.to_string(),
                )])),
            }
        } else {
            Err(CommandError::Invalid(vec![FieldError::new(
                "task",
                "the schedule names neither a task nor a pipeline",
            )]))
        };
        match outcome {
            Ok(()) => Ok(fired),
            // Refused for good (its body no longer passes, a repeat key
            // with another body): recorded, not retried.
            Err(
                e @ (CommandError::Invalid(_)
                | CommandError::Forbidden(_)
                | CommandError::IdempotencyMismatch),
            ) => {
                warn!(error = %e.describe(), "scheduled submission refused");
                fired.error = Some(e.describe());
                Ok(fired)
            }
            Err(e) => Err(e),
        }
    }
}

/// A UUIDv7 for time `due` whose other bits come from `seed`: the same
/// schedule and time always give the same id.
pub fn derived_id(due: Millis, seed: &[u8]) -> uuid::Uuid {
    use sha2::Digest;
    let hash = sha2::Sha256::new()
        .chain_update(seed)
        .chain_update(due.to_be_bytes())
        .finalize();
    let mut rest = [0u8; 10];
    rest.copy_from_slice(&hash[..10]);
    uuid::Builder::from_unix_timestamp_millis(u64::try_from(due).unwrap_or(0), &rest).into_uuid()
}
