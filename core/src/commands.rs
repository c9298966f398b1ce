//! Command handling: load the aggregate, decide, append with a concurrency
//! check. The only place where domain decisions meet I/O.

use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{info, instrument};
use ud_schemas::codec::EventMeta;
use ud_schemas::{streams, subjects, ProjectId, TaskId, TaskSpec};

use crate::aggregate::{ExecuteError, Repository, Retries};
use crate::store::{EventStore, StoreError};
use crate::task::{Task, TaskCommand, TaskError};
use crate::token::{Token, TokenCommand, TokenError};
use crate::validate::{self, FieldError, SubmitTask};

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The user's input is wrong (HTTP 400).
    #[error("invalid request")]
    Invalid(Vec<FieldError>),
    /// The caller may not act on this project (HTTP 403).
    #[error("not allowed for project {0}")]
    Forbidden(String),
    /// No such task, or not one the caller may see (HTTP 404).
    #[error("task not found")]
    NotFound,
    /// The task's state does not allow the command (HTTP 409).
    #[error(transparent)]
    Rejected(TaskError),
    /// No such pipeline, or not one the caller may see (HTTP 404).
    #[error("pipeline not found")]
    NoPipeline,
    /// The pipeline's state does not allow the command (HTTP 409).
    #[error(transparent)]
    PipelineRejected(crate::pipeline::PipelineError),
    /// No such schedule, or not one the caller may see (HTTP 404).
    #[error("schedule not found")]
    NoSchedule,
    /// The schedule's state does not allow the command (HTTP 409).
    #[error(transparent)]
    ScheduleRejected(crate::schedule::ScheduleError),
    /// No such project (HTTP 404).
    #[error("project not found")]
    NoProject,
    /// The project's state does not allow the command (HTTP 409).
    #[error(transparent)]
    ProjectRejected(crate::project::ProjectError),
    /// Another command changed the task first (HTTP 409, retry).
    #[error("the task was changed concurrently; read it again and retry")]
    Conflict,
    /// The Idempotency-Key was used before with a different request (HTTP 422).
    #[error("Idempotency-Key was already used for a different request")]
    IdempotencyMismatch,
    /// The event store failed (HTTP 503).
    #[error(transparent)]
    Unavailable(StoreError),
    /// The idempotency bucket failed (HTTP 503).
    #[error("the idempotency keys are unavailable: {0}")]
    Idempotency(#[source] crate::store::NatsError),
}

fn secret_error(e: crate::secrets::SecretError) -> CommandError {
    use crate::secrets::SecretError;
    match e {
        SecretError::Store(e) => e.into(),
        SecretError::Invalid { field, reason } => {
            CommandError::Invalid(vec![FieldError::new(field, reason)])
        }
        other => CommandError::Unavailable(StoreError::Unavailable(other.to_string().into())),
    }
}

impl From<StoreError> for CommandError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => Self::Conflict,
            other => Self::Unavailable(other),
        }
    }
}

/// The outcome of an accepted command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub task_id: TaskId,
    /// Stream sequence of the last event the command appended (or found).
    pub seq: u64,
    /// False when an earlier request with the same Idempotency-Key created the task.
    pub created: bool,
}

#[derive(Serialize, Deserialize)]
struct IdempotencyRecord {
    task_id: TaskId,
    request_digest: String,
}

#[derive(Clone)]
pub struct TaskCommands {
    tasks: Repository<Task>,
    idempotency: kv::Store,
    /// Project secrets, when the platform holds a key for them.
    secrets: Option<crate::secrets::Secrets>,
    /// The object stores tasks may name.
    stores: ud_storage::Stores,
}

/// Most tasks a main server remembers (see [`Repository`]'s cache).
const RECENT_TASKS: u64 = 100_000;

impl From<ExecuteError<TaskError>> for CommandError {
    fn from(e: ExecuteError<TaskError>) -> Self {
        match e {
            ExecuteError::Rejected(TaskError::NotFound) | ExecuteError::Hidden => Self::NotFound,
            ExecuteError::Rejected(e) => Self::Rejected(e),
            ExecuteError::Conflict => Self::Conflict,
            ExecuteError::Store(e) => e.into(),
        }
    }
}

fn request_digest(project: &ProjectId, spec: &TaskSpec) -> String {
    let json = serde_json::to_vec(&(project, spec)).unwrap_or_default();
    hex::encode(Sha256::digest(json))
}

fn idempotency_kv_key(project: &ProjectId, key: &str) -> String {
    hex::encode(Sha256::digest(format!("{project}\n{key}").as_bytes()))
}

impl TaskCommands {
    pub async fn new(store: EventStore) -> Result<Self, StoreError> {
        let idempotency = store
            .jetstream()
            .get_key_value(streams::IDEMPOTENCY_BUCKET)
            .await
            .map_err(crate::store::unavailable)?;
        Ok(Self {
            tasks: Repository::cached(store, RECENT_TASKS, None),
            idempotency,
            secrets: None,
            stores: ud_storage::Stores::default(),
        })
    }

    /// Tasks may name project secrets (checked to be set when submitted).
    pub fn with_secrets(mut self, secrets: Option<crate::secrets::Secrets>) -> Self {
        self.secrets = secrets;
        self
    }

    /// Tasks may name these object stores of their projects.
    pub fn with_stores(mut self, stores: ud_storage::Stores) -> Self {
        self.stores = stores;
        self
    }

    /// Project secrets, when the platform holds a key for them.
    pub fn secrets(&self) -> Option<&crate::secrets::Secrets> {
        self.secrets.as_ref()
    }

    /// What a spec names beyond itself: project secrets that must be set,
    /// an earlier task whose checkpoint it continues.
    pub(crate) async fn check_references(
        &self,
        project: &ProjectId,
        spec: &TaskSpec,
    ) -> Result<(), CommandError> {
        let mut errors = Vec::new();
        if !spec.secrets.is_empty() {
            match &self.secrets {
                None => errors.push(FieldError::new(
                    "secrets",
                    "this platform holds no key for secrets (UD_SECRETS_KEY_FILE)",
                )),
                Some(secrets) => {
                    let missing = secrets
                        .missing(project, &spec.secrets)
                        .await
                        .map_err(secret_error)?;
                    for (i, name) in spec.secrets.iter().enumerate() {
                        if missing.contains(name) {
                            errors.push(FieldError::new(
                                format!("secrets[{i}]"),
                                format!("{name} is not set in project {project} (unidesk secret set {project} {name})"),
                            ));
                        }
                    }
                }
            }
        }
        if let Some(name) = &spec.store {
            if !self.stores.has(project.as_str(), name) {
                errors.push(FieldError::new(
                    "store",
                    format!("project {project} has no store {name:?} (GET /api/v1/projects/{project}/stores)"),
                ));
            }
        }
        if let Some(from) = spec.checkpoint.as_ref().and_then(|c| c.from) {
            let found = self.tasks.current(&from).await?;
            if found.is_none_or(|(t, _)| &t.project != project) {
                errors.push(FieldError::new(
                    "checkpoint.resume_from",
                    format!("no task {from} in project {project}"),
                ));
            }
        }
        for (i, input) in spec.inputs.iter().enumerate() {
            use ud_schemas::spec::InputSource;
            if let Ok(InputSource::TaskOutput { task, .. }) = InputSource::parse(&input.source) {
                let found = self.tasks.current(&task).await?;
                if found.is_none_or(|(t, _)| &t.project != project) {
                    errors.push(FieldError::new(
                        format!("inputs[{i}].source"),
                        format!("no task {task} in project {project}"),
                    ));
                }
            }
        }
        for (i, a) in spec.after.iter().enumerate() {
            let found = self.tasks.current(&a.task).await?;
            if found.is_none_or(|(t, _)| &t.project != project) {
                errors.push(FieldError::new(
                    format!("after[{i}].task"),
                    format!("no task {} in project {project}", a.task),
                ));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(CommandError::Invalid(errors))
        }
    }

    pub fn store(&self) -> &EventStore {
        self.tasks.store()
    }

    /// The tasks' repository: every change to a task goes through it.
    pub fn tasks(&self) -> &Repository<Task> {
        &self.tasks
    }

    /// Submits a task. With an idempotency key, a repeat returns the first
    /// task and appends nothing.
    #[instrument(skip_all, fields(project = %req.project))]
    pub async fn submit(
        &self,
        req: &SubmitTask,
        idempotency_key: Option<&str>,
        actor: &str,
        may_use: impl Fn(&ProjectId) -> bool,
    ) -> Result<Accepted, CommandError> {
        let mut errors = Vec::new();
        if let Some(k) = idempotency_key {
            if let Err(e) = validate::idempotency_key(k) {
                errors.push(e);
            }
        }
        let (project, spec) = match validate::submit_task(req) {
            Ok(ok) if errors.is_empty() => ok,
            Ok(_) => return Err(CommandError::Invalid(errors)),
            Err(mut e) => {
                errors.append(&mut e);
                return Err(CommandError::Invalid(errors));
            }
        };
        if !may_use(&project) {
            return Err(CommandError::Forbidden(project.to_string()));
        }
        for (i, input) in spec.inputs.iter().enumerate() {
            if input.source.starts_with("step:") {
                return Err(CommandError::Invalid(vec![FieldError::new(
                    format!("inputs[{i}].source"),
                    "step:<name>/ names a step's outputs in a pipeline; a task names another task's as task:<id>/",
                )]));
            }
        }
        self.check_references(&project, &spec).await?;
        let digest = request_digest(&project, &spec);
        let mut spec = spec;
        if let Some(s) = spec.session.as_mut() {
            // Drawn after the digest: a repeat with the same key is the same request.
            s.id = hex::encode(rand::random::<[u8; 16]>());
        }
        let mut task_id = TaskId::new();
        if let Some(key) = idempotency_key {
            let kv_key = idempotency_kv_key(&project, key);
            let record = serde_json::to_vec(&IdempotencyRecord {
                task_id,
                request_digest: digest.clone(),
            })
            .map_err(|e| CommandError::Idempotency(e.into()))?;
            match self.idempotency.create(&kv_key, record.into()).await {
                Ok(_) => {}
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    let earlier = self
                        .idempotency
                        .get(&kv_key)
                        .await
                        .map_err(|e| CommandError::Idempotency(e.into()))?
                        .and_then(|b| serde_json::from_slice::<IdempotencyRecord>(&b).ok())
                        .ok_or_else(|| {
                            CommandError::Idempotency("a record is unreadable".into())
                        })?;
                    if earlier.request_digest != digest {
                        return Err(CommandError::IdempotencyMismatch);
                    }
                    task_id = earlier.task_id;
                }
                Err(e) => return Err(CommandError::Idempotency(e.into())),
            }
        }
        let cmd = TaskCommand::Submit {
            project,
            spec,
            idempotency_key: idempotency_key.map(str::to_owned),
        };
        match self
            .tasks
            .create(task_id, cmd, &EventMeta::new(actor))
            .await
        {
            Ok(done) => {
                info!(task_id = %task_id, "task submitted");
                Ok(Accepted {
                    task_id,
                    seq: done.seq,
                    created: true,
                })
            }
            // The key's task exists already: a repeat.
            Err(ExecuteError::Conflict) if idempotency_key.is_some() => {
                let seq = self.last_seq(&task_id).await?;
                Ok(Accepted {
                    task_id,
                    seq,
                    created: false,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn last_seq(&self, id: &TaskId) -> Result<u64, CommandError> {
        let stream = self
            .store()
            .jetstream()
            .get_stream_no_info(streams::TASKS)
            .await
            .map_err(crate::store::unavailable)?;
        let msg = stream
            .direct_get_last_for_subject(subjects::task_event(id, "submitted"))
            .await
            .map_err(crate::store::unavailable)?;
        Ok(msg.sequence)
    }

    /// Runs a command against an existing task the caller may see. A
    /// concurrent change (often only a note such as `waiting`) means: read
    /// the task again and decide again; three tries, then 409.
    #[instrument(skip_all, fields(task_id = %id, command = command.name()))]
    pub async fn execute(
        &self,
        id: TaskId,
        command: TaskCommand,
        actor: &str,
        may_see: impl Fn(&ProjectId) -> bool,
    ) -> Result<Accepted, CommandError> {
        let done = self
            .tasks
            .execute(id, command, &EventMeta::new(actor), Retries(2), |t| {
                may_see(&t.project)
            })
            .await?;
        Ok(Accepted {
            task_id: id,
            seq: done.seq,
            created: !done.events.is_empty(),
        })
    }

    /// Cancels a task; the reason is checked here, whoever asks (REST or NATS).
    pub async fn cancel(
        &self,
        id: TaskId,
        reason: &str,
        actor: &str,
        may_see: impl Fn(&ProjectId) -> bool,
    ) -> Result<Accepted, CommandError> {
        validate::reason("reason", reason).map_err(|f| CommandError::Invalid(vec![f]))?;
        let command = TaskCommand::Cancel {
            reason: reason.to_owned(),
        };
        self.execute(id, command, actor, may_see).await
    }
}

impl CommandError {
    /// The HTTP status that this error means, also used as the NATS service error code.
    pub fn status_code(&self) -> u16 {
        match self {
            Self::Invalid(_) => 400,
            Self::Forbidden(_) => 403,
            Self::NotFound => 404,
            Self::NoPipeline | Self::NoSchedule | Self::NoProject => 404,
            Self::Rejected(_)
            | Self::PipelineRejected(_)
            | Self::ProjectRejected(_)
            | Self::ScheduleRejected(_)
            | Self::Conflict => 409,
            Self::IdempotencyMismatch => 422,
            Self::Unavailable(_) | Self::Idempotency(_) => 503,
        }
    }

    /// A one-line description including field errors.
    pub fn describe(&self) -> String {
        match self {
            Self::Invalid(fields) => fields
                .iter()
                .map(|f| format!("{}: {}", f.field, f.reason))
                .collect::<Vec<_>>()
                .join("; "),
            other => other.to_string(),
        }
    }
}

/// A newly issued API token. The secret is shown once and never stored.
#[derive(Clone, Debug)]
pub struct IssuedToken {
    pub token_id: ud_schemas::TokenId,
    pub secret: String,
    pub seq: u64,
}

/// A token to issue. A user's token carries that user's project roles;
/// one without a user names its projects itself (and is an owner there).
#[derive(Clone, Debug, Default)]
pub struct NewToken {
    pub name: String,
    pub projects: Vec<String>,
    pub admin: bool,
    pub user: Option<String>,
    pub expires_at: Option<ud_schemas::Millis>,
}

impl NewToken {
    /// A token that names its projects (admins see every project).
    pub fn scoped(name: &str, projects: &[String], admin: bool) -> Self {
        Self {
            name: name.to_owned(),
            projects: projects.to_vec(),
            admin,
            ..Self::default()
        }
    }
}

/// Issues a token; the secret is returned once.
pub async fn issue_token(
    store: &EventStore,
    token: &NewToken,
    actor: &str,
) -> Result<IssuedToken, CommandError> {
    let mut errors = Vec::new();
    let name = token.name.as_str();
    if name.is_empty() || !crate::validate::plain_text(name, 100) {
        errors.push(FieldError::new(
            "name",
            "must be 1-100 bytes without control characters",
        ));
    }
    let mut parsed = Vec::new();
    for (i, p) in token.projects.iter().enumerate() {
        match ProjectId::parse(p) {
            Ok(p) => parsed.push(p),
            Err(e) => errors.push(FieldError::new(format!("projects[{i}]"), e.to_string())),
        }
    }
    if let Some(user) = &token.user {
        if let Err(reason) = ud_schemas::spec::user_name(user) {
            errors.push(FieldError::new("user", reason));
        }
        if !parsed.is_empty() {
            errors.push(FieldError::new(
                "projects",
                "a user's token carries the user's roles: name no projects",
            ));
        }
    }
    if let Some(at) = token.expires_at {
        if at <= ud_schemas::now_millis() {
            errors.push(FieldError::new("expires_at", "must be in the future"));
        }
    }
    if parsed.is_empty() && !token.admin && token.user.is_none() && errors.is_empty() {
        errors.push(FieldError::new(
            "projects",
            "a token needs a user, at least one project, or admin",
        ));
    }
    if !errors.is_empty() {
        return Err(CommandError::Invalid(errors));
    }
    let secret = crate::auth::generate_secret();
    let token_id = ud_schemas::TokenId::new();
    let command = TokenCommand::Issue {
        name: name.to_owned(),
        digest: crate::auth::digest(&secret),
        projects: parsed,
        admin: token.admin,
        user: token.user.clone(),
        expires_at: token.expires_at,
    };
    let done = Repository::<Token>::new(store.clone())
        .create(token_id, command, &EventMeta::new(actor))
        .await
        .map_err(token_error)?;
    Ok(IssuedToken {
        token_id,
        secret,
        seq: done.seq,
    })
}

/// Runs a command on a project: creating it, setting or removing a member,
/// archiving it. User names are checked here, whoever asks.
pub async fn project_command(
    store: &EventStore,
    project: &ProjectId,
    command: crate::project::ProjectCommand,
    actor: &str,
) -> Result<u64, CommandError> {
    use crate::project::{Project, ProjectCommand, ProjectError};
    let user = match &command {
        ProjectCommand::Create { owner, .. } => Some(("owner", owner)),
        ProjectCommand::SetMember { user, .. } | ProjectCommand::RemoveMember { user } => {
            Some(("user", user))
        }
        ProjectCommand::Archive => None,
    };
    if let Some((field, user)) = user {
        ud_schemas::spec::user_name(user)
            .map_err(|r| CommandError::Invalid(vec![FieldError::new(field, r)]))?;
    }
    if let ProjectCommand::Create { description, .. } = &command {
        if !crate::validate::plain_text(description, 500) {
            return Err(CommandError::Invalid(vec![FieldError::new(
                "description",
                "at most 500 bytes without control characters",
            )]));
        }
    }
    let repo = Repository::<Project>::new(store.clone());
    let meta = EventMeta::new(actor);
    let creating = matches!(command, ProjectCommand::Create { .. });
    let done = match command {
        ProjectCommand::Create { .. } => repo.create(project.clone(), command, &meta).await,
        _ => {
            repo.execute(project.clone(), command, &meta, Retries(2), |_| true)
                .await
        }
    };
    match done {
        Ok(done) => Ok(done.seq),
        Err(ExecuteError::Rejected(ProjectError::NotFound)) | Err(ExecuteError::Hidden) => {
            Err(CommandError::NoProject)
        }
        Err(ExecuteError::Conflict) if creating => {
            Err(CommandError::ProjectRejected(ProjectError::Exists))
        }
        Err(ExecuteError::Conflict) => Err(CommandError::Conflict),
        Err(ExecuteError::Rejected(e)) => Err(CommandError::ProjectRejected(e)),
        Err(ExecuteError::Store(e)) => Err(e.into()),
    }
}

fn token_error(e: ExecuteError<TokenError>) -> CommandError {
    match e {
        ExecuteError::Rejected(TokenError::NotFound) | ExecuteError::Hidden => {
            CommandError::NotFound
        }
        ExecuteError::Rejected(TokenError::AlreadyIssued) | ExecuteError::Conflict => {
            CommandError::Conflict
        }
        ExecuteError::Store(e) => e.into(),
    }
}

/// Revokes a token; it stops working as soon as the revocation is projected.
pub async fn revoke_token(
    store: &EventStore,
    id: ud_schemas::TokenId,
    actor: &str,
) -> Result<u64, CommandError> {
    let done = Repository::<Token>::new(store.clone())
        .execute(
            id,
            TokenCommand::Revoke,
            &EventMeta::new(actor),
            Retries(2),
            |_| true,
        )
        .await
        .map_err(token_error)?;
    Ok(done.seq)
}
