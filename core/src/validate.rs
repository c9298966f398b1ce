//! User input to validated specs. Every rejection names the field and the reason.

use ud_schemas::spec::{Resources, RetryPolicy};
use ud_schemas::{ProjectId, TaskSpec};

pub use ud_schemas::api::{
    CheckpointRequest, FieldError, ResourceRequest, RetryRequest, SubmitTask,
};

/// Upper bounds on what one task may ask for.
pub mod limits {
    pub const MAX_CPUS: f64 = 1024.0;
    pub const MAX_MEMORY_MB: i64 = 16 * 1024 * 1024;
    pub const MAX_GPUS: i64 = 64;
    pub const MAX_TIMEOUT_SECONDS: i64 = 30 * 24 * 3600;
    pub const DEFAULT_TIMEOUT_SECONDS: i64 = 24 * 3600;
    pub const MAX_ATTEMPTS: i64 = 100;
    pub const MAX_BACKOFF_SECONDS: i64 = 24 * 3600;
    pub const MAX_ARGV: usize = 256;
    pub const MAX_ARG_BYTES: usize = 4096;
    pub const MAX_ENV: usize = 256;
    pub const MAX_ENV_VALUE_BYTES: usize = 32 * 1024;
    pub const MAX_LABELS: usize = 64;
    pub const MAX_URL_BYTES: usize = 2048;
    pub const MAX_IMAGE_BYTES: usize = 512;
    pub const MAX_PATH_BYTES: usize = 1024;
    pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;
    pub const MAX_FILES: usize = 256;
    pub const MAX_QUEUE_NAME_BYTES: usize = 63;
    pub const MAX_REASON_BYTES: usize = 1000;
    pub const MAX_NAME_BYTES: usize = 200;
    pub const MAX_GPU_MODEL_BYTES: usize = 128;
    pub const MAX_LABEL_BYTES: usize = 63;
    pub const MAX_EXIT_CODES: usize = 64;
    pub const MAX_DISK_MB: i64 = 100_000_000;
    pub const MIN_PRIORITY: i64 = -1000;
    pub const MAX_PRIORITY: i64 = 1000;
    pub const MAX_GPU_MEMORY_MB: i64 = 1024 * 1024;
    pub const MAX_VERSION_BYTES: usize = 32;
    pub const MAX_SHM_MB: i64 = 1024 * 1024;
    pub const MAX_SECRETS: usize = 64;
    pub const MIN_CHECKPOINT_SECONDS: i64 = 10;
    pub const MAX_PORTS: usize = 16;
    pub const DEFAULT_SESSION_IDLE_MINUTES: i64 = 60;
    pub const MAX_SESSION_IDLE_MINUTES: i64 = 30 * 24 * 60;
    pub const MAX_CHECKPOINT_SECONDS: i64 = 24 * 3600;
    pub const DEFAULT_CHECKPOINT_SECONDS: i64 = 600;
    /// Most tasks one task may run after.
    pub const MAX_AFTER: usize = 64;
    /// Longest a disconnected run may wait for its node: 7 days.
    pub const MAX_LOST_AFTER_SECONDS: i64 = 7 * 24 * 3600;
}

/// A dotted version of numbers (`8.0`, `535.104.05`).
fn dotted_version(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= limits::MAX_VERSION_BYTES
        && v.split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// A secret's name: what its environment variable is called too.
pub fn secret_name(field: &str, name: &str) -> Result<(), FieldError> {
    ud_schemas::spec::secret_name(name)
        .map(|_| ())
        .map_err(|reason| FieldError::new(field, reason))
}

struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.0.push(FieldError::new(field, reason));
    }
}

/// A repository URL's parts that matter to validation and credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoUrl<'a> {
    pub scheme: &'a str,
    /// User name in the URL, if any (`ssh://git@host/...`).
    pub user: Option<&'a str>,
    /// Whether the URL carries a password (`https://user:secret@host/...`).
    pub has_password: bool,
    /// Host with its port, if any (empty for `file://`).
    pub host: &'a str,
    pub path: &'a str,
}

/// Splits `scheme://[user[:password]@]host[:port]/path`.
pub fn parse_repo_url(url: &str) -> Option<RepoUrl<'_>> {
    let (scheme, rest) = url.split_once("://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let (userinfo, host) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (user, has_password) = match userinfo {
        Some(u) => match u.split_once(':') {
            Some((name, _)) => (Some(name), true),
            None => (Some(u), false),
        },
        None => (None, false),
    };
    Some(RepoUrl {
        scheme,
        user,
        has_password,
        host,
        path,
    })
}

pub fn repo_url(field: &str, url: &str) -> Result<(), FieldError> {
    let err = |r: &str| Err(FieldError::new(field, r));
    if url.len() > limits::MAX_URL_BYTES {
        return err(&format!("longer than {} bytes", limits::MAX_URL_BYTES));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return err("must not contain whitespace or control characters");
    }
    let Some(parsed) = parse_repo_url(url) else {
        return err("must be a URL with scheme https, http, ssh, git or file");
    };
    if !matches!(parsed.scheme, "https" | "http" | "ssh" | "git" | "file") {
        return err(&format!(
            "scheme {:?} is not allowed; use https, http, ssh, git or file",
            parsed.scheme
        ));
    }
    if parsed.scheme == "file" {
        if parsed.path.is_empty() || parsed.path == "/" {
            return err("has no host or path");
        }
        return Ok(());
    }
    if parsed.host.is_empty() || parsed.path.is_empty() || parsed.path == "/" {
        return err("has no host or path");
    }
    if parsed.has_password || (parsed.user.is_some() && parsed.scheme != "ssh") {
        return err("must not carry credentials: the platform holds them per repository host (see UD_GIT_CREDENTIALS_FILE)");
    }
    Ok(())
}

/// A task priority: -1000 to 1000.
/// An image reference as Docker and Kubernetes read it:
/// `[registry[:port]/]name[/name...][:tag][@algorithm:hex]`, the name's
/// components lowercase.
pub fn image_ref(field: &str, r: &str) -> Result<(), FieldError> {
    let err = |why: &str| Err(FieldError::new(field, why));
    if r.is_empty() || r.len() > limits::MAX_IMAGE_BYTES {
        return err(&format!("must be 1 to {} bytes", limits::MAX_IMAGE_BYTES));
    }
    let (rest, digest) = match r.split_once('@') {
        Some((rest, d)) => (rest, Some(d)),
        None => (r, None),
    };
    if let Some(d) = digest {
        let ok = d.split_once(':').is_some_and(|(algo, hex)| {
            !algo.is_empty()
                && algo
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
                && hex.len() >= 32
                && hex.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'))
                && (algo != "sha256" || hex.len() == 64)
        });
        if !ok {
            return err("has a digest that is not algorithm:hex (sha256: and 64 hex digits)");
        }
    }
    let (name, tag) = match rest.rfind(':') {
        Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    if let Some(t) = tag {
        let ok = !t.is_empty()
            && t.len() <= 128
            && !t.starts_with(['.', '-'])
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !ok {
            return err("has a tag that is not 1 to 128 letters, digits, _ . -");
        }
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    // A first part with a dot, a port or `localhost` names the registry.
    if parts.len() > 1 && (parts[0].contains(['.', ':']) || parts[0] == "localhost") {
        let registry = parts.remove(0);
        let (host, port) = match registry.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (registry, None),
        };
        let host_ok = !host.is_empty()
            && host
                .split('.')
                .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        let port_ok = port.is_none_or(|p| !p.is_empty() && p.parse::<u16>().is_ok());
        if !host_ok || !port_ok {
            return err("has a registry that is not host[:port]");
        }
    }
    let component = |c: &str| {
        !c.is_empty()
            && c.chars().all(|ch| {
                ch.is_ascii_lowercase() || ch.is_ascii_digit() || matches!(ch, '.' | '_' | '-')
            })
            && c.starts_with(|ch: char| ch.is_ascii_alphanumeric())
            && c.ends_with(|ch: char| ch.is_ascii_alphanumeric())
    };
    if !parts.iter().all(|c| component(c)) {
        return err("has a name that is not lowercase letters, digits and . _ - between slashes");
    }
    Ok(())
}

pub fn priority_value(p: i64) -> Result<i32, FieldError> {
    match i32::try_from(p) {
        Ok(v) if (limits::MIN_PRIORITY..=limits::MAX_PRIORITY).contains(&i64::from(v)) => Ok(v),
        _ => Err(FieldError::new(
            "priority",
            format!(
                "must be between {} and {}",
                limits::MIN_PRIORITY,
                limits::MAX_PRIORITY
            ),
        )),
    }
}

pub fn commit_id(field: &str, id: &str) -> Result<String, FieldError> {
    let ok = matches!(id.len(), 40 | 64) && id.bytes().all(|b| b.is_ascii_hexdigit());
    if ok {
        Ok(id.to_ascii_lowercase())
    } else {
        Err(FieldError::new(
            field,
            "must be a full commit id: 40 or 64 hex characters",
        ))
    }
}

/// A path inside a repository or workspace (the one rule:
/// [`ud_schemas::spec::relative_path`]).
pub fn relative_path(field: &str, path: &str) -> Result<(), FieldError> {
    ud_schemas::spec::relative_path(path)
        .map(|_| ())
        .map_err(|reason| FieldError::new(field, format!("{path:?} {reason}")))
}

/// A queue's name: 1 to [`limits::MAX_QUEUE_NAME_BYTES`] of a-z, 0-9, `-` and `_`.
pub fn queue_name(field: &str, name: &str) -> Result<(), FieldError> {
    let ok = (1..=limits::MAX_QUEUE_NAME_BYTES).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("1-{} of a-z, 0-9, - and _", limits::MAX_QUEUE_NAME_BYTES),
        ))
    }
}

/// Why someone cancelled or cordoned: text for people, at most
/// [`limits::MAX_REASON_BYTES`] without control characters.
pub fn reason(field: &str, text: &str) -> Result<(), FieldError> {
    if plain_text(text, limits::MAX_REASON_BYTES) {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!(
                "at most {} bytes without control characters",
                limits::MAX_REASON_BYTES
            ),
        ))
    }
}

/// Text a person wrote that goes into headers, rows and logs: at most `max`
/// bytes, without control characters (line breaks, NUL).
pub fn plain_text(s: &str, max: usize) -> bool {
    s.len() <= max && !s.chars().any(char::is_control)
}

fn label_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= limits::MAX_LABEL_BYTES
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
}

fn argv(errors: &mut Errors, field: &str, list: &[String], required: bool) {
    if required && list.is_empty() {
        errors.add(field, "must name at least the program to run");
    }
    if list.len() > limits::MAX_ARGV {
        errors.add(field, format!("more than {} entries", limits::MAX_ARGV));
    }
    for (i, a) in list.iter().enumerate() {
        if a.len() > limits::MAX_ARG_BYTES {
            errors.add(
                format!("{field}[{i}]"),
                format!("longer than {} bytes", limits::MAX_ARG_BYTES),
            );
        }
        if a.contains('\0') {
            errors.add(format!("{field}[{i}]"), "contains NUL");
        }
    }
}

/// The request that submits `task`'s `spec` again in `project` (a rerun):
/// it validates to the same spec, its checkpoint continuing `task`'s.
pub fn rerun_request(project: &str, task: ud_schemas::TaskId, spec: &TaskSpec) -> SubmitTask {
    let r = &spec.resources;
    SubmitTask {
        project: project.to_owned(),
        name: spec.name.clone(),
        code_repo_url: spec.code_repo_url.clone(),
        code_commit_id: spec.code_commit_id.clone(),
        env_repo_url: spec.env_repo_url.clone(),
        env_commit_id: spec.env_commit_id.clone(),
        dockerfile_path: spec.dockerfile_path.clone(),
        command: spec.command.clone(),
        args: spec.args.clone(),
        env: spec.env.clone(),
        resources: ResourceRequest {
            cpus: f64::from(r.cpu_millis) / 1000.0,
            memory_mb: i64::try_from(r.memory_mb).unwrap_or(i64::MAX),
            gpus: i64::from(r.gpus),
            gpu_model: r.gpu_model.clone(),
            labels: r.labels.clone(),
            preferred_labels: r.preferred_labels.clone(),
            disk_mb: i64::try_from(r.disk_mb).unwrap_or(i64::MAX),
            gpu_memory_mb: i64::try_from(r.gpu_memory_mb).unwrap_or(i64::MAX),
            gpu_compute_capability: r.gpu_compute_capability.clone(),
            gpu_driver: r.gpu_driver.clone(),
            gpu_shared: r.gpu_shared,
        },
        timeout_seconds: Some(i64::try_from(spec.timeout_seconds).unwrap_or(i64::MAX)),
        retry: Some(RetryRequest {
            max_attempts: i64::from(spec.retry.max_attempts),
            backoff_seconds: i64::from(spec.retry.backoff_seconds),
            exit_codes: spec
                .retry
                .exit_codes
                .iter()
                .map(|c| i64::from(*c))
                .collect(),
            on_timeout: spec.retry.on_timeout,
        }),
        priority: Some(i64::from(spec.priority)),
        queue: Some(spec.queue.clone()),
        inputs: spec.inputs.clone(),
        outputs: spec.outputs.clone(),
        network: Some(r.network),
        shm_size_mb: spec
            .shm_size_mb
            .map(|m| i64::try_from(m).unwrap_or(i64::MAX)),
        secrets: spec.secrets.clone(),
        // A rerun goes on from the checkpoint its first task started.
        checkpoint: spec.checkpoint.as_ref().map(|c| CheckpointRequest {
            path: c.path.clone(),
            every_seconds: Some(i64::try_from(c.every_seconds).unwrap_or(i64::MAX)),
            resume_from: Some(c.owner(task).to_string()),
        }),
        lost_after_seconds: spec
            .lost_after_seconds
            .map(|s| i64::try_from(s).unwrap_or(i64::MAX)),
        after: spec
            .after
            .iter()
            .map(|a| ud_schemas::api::AfterRequest {
                task: a.task.to_string(),
                when: Some(
                    match a.when {
                        ud_schemas::spec::AfterWhen::Success => "success",
                        ud_schemas::spec::AfterWhen::Any => "any",
                    }
                    .to_owned(),
                ),
            })
            .collect(),
        store: spec.store.clone(),
        ports: spec
            .ports
            .iter()
            .filter(|p| spec.session.as_ref().is_none_or(|s| s.port != **p))
            .map(|p| i64::from(*p))
            .collect(),
        image: spec.image.clone(),
        // A rerun is a new session, with an id of its own.
        session: spec
            .session
            .as_ref()
            .map(|s| ud_schemas::api::SessionRequest {
                port: i64::from(s.port),
                idle_timeout_minutes: Some(s.idle_timeout_seconds as f64 / 60.0),
            }),
    }
}

/// Validates a submission into the project and spec recorded in the event.
pub fn submit_task(req: &SubmitTask) -> Result<(ProjectId, TaskSpec), Vec<FieldError>> {
    let mut e = Errors(Vec::new());
    let project =
        ProjectId::parse(&req.project).map_err(|err| FieldError::new("project", err.to_string()));
    if let Err(f) = &project {
        e.0.push(f.clone());
    }
    if let Some(name) = &req.name {
        if !plain_text(name, limits::MAX_NAME_BYTES) {
            e.add(
                "name",
                format!(
                    "longer than {} bytes or contains control characters",
                    limits::MAX_NAME_BYTES
                ),
            );
        }
    }
    if let Err(f) = repo_url("code_repo_url", &req.code_repo_url) {
        e.0.push(f);
    }
    let code_commit = commit_id("code_commit_id", &req.code_commit_id)
        .map_err(|f| e.0.push(f))
        .ok();
    // The environment: an image pulled from its registry, or one built
    // from the env repository at its commit; never both.
    let env_commit = match &req.image {
        Some(image) => {
            if let Err(f) = image_ref("image", image) {
                e.0.push(f);
            }
            let env_given = [&req.env_repo_url, &req.env_commit_id, &req.dockerfile_path]
                .iter()
                .any(|f| !f.is_empty());
            if env_given {
                e.add(
                    "image",
                    "names the environment, so env_repo_url, env_commit_id and dockerfile_path must be empty",
                );
            }
            Some(String::new())
        }
        None => {
            if let Err(f) = repo_url("env_repo_url", &req.env_repo_url) {
                e.0.push(f);
            }
            let commit = commit_id("env_commit_id", &req.env_commit_id)
                .map_err(|f| e.0.push(f))
                .ok();
            if let Err(f) = relative_path("dockerfile_path", &req.dockerfile_path) {
                e.0.push(f);
            }
            commit
        }
    };
    argv(&mut e, "command", &req.command, true);
    argv(&mut e, "args", &req.args, false);
    if req.env.len() > limits::MAX_ENV {
        e.add("env", format!("more than {} variables", limits::MAX_ENV));
    }
    for (k, v) in &req.env {
        if !ud_schemas::spec::env_name(k) {
            e.add(
                format!("env.{k}"),
                "names are letters, digits and '_', not starting with a digit",
            );
        }
        if v.len() > limits::MAX_ENV_VALUE_BYTES || v.contains('\0') {
            e.add(
                format!("env.{k}"),
                format!(
                    "value longer than {} bytes or contains NUL",
                    limits::MAX_ENV_VALUE_BYTES
                ),
            );
        }
    }
    let r = &req.resources;
    if !(r.cpus.is_finite() && r.cpus >= 0.001 && r.cpus <= limits::MAX_CPUS) {
        e.add(
            "resources.cpus",
            format!("must be between 0.001 and {}", limits::MAX_CPUS),
        );
    }
    if !(1..=limits::MAX_MEMORY_MB).contains(&r.memory_mb) {
        e.add(
            "resources.memory_mb",
            format!("must be between 1 and {}", limits::MAX_MEMORY_MB),
        );
    }
    if !(0..=limits::MAX_GPUS).contains(&r.gpus) {
        e.add(
            "resources.gpus",
            format!("must be between 0 and {}", limits::MAX_GPUS),
        );
    }
    if let Some(m) = &r.gpu_model {
        if m.is_empty() || !plain_text(m, limits::MAX_GPU_MODEL_BYTES) {
            e.add(
                "resources.gpu_model",
                format!(
                    "must be 1-{} bytes without control characters",
                    limits::MAX_GPU_MODEL_BYTES
                ),
            );
        }
    }
    if r.labels.len() > limits::MAX_LABELS {
        e.add(
            "resources.labels",
            format!("more than {} labels", limits::MAX_LABELS),
        );
    }
    if !(0..=limits::MAX_DISK_MB).contains(&r.disk_mb) {
        e.add(
            "resources.disk_mb",
            format!("must be between 0 and {}", limits::MAX_DISK_MB),
        );
    }
    for (field, labels) in [
        ("labels", &r.labels),
        ("preferred_labels", &r.preferred_labels),
    ] {
        for (k, v) in labels {
            if !label_key(k) || !plain_text(v, limits::MAX_LABEL_BYTES) {
                e.add(
                    format!("resources.{field}.{k}"),
                    format!("keys are 1-{0} of [A-Za-z0-9-_./], values at most {0} bytes without control characters", limits::MAX_LABEL_BYTES),
                );
            }
        }
    }
    let timeout = req
        .timeout_seconds
        .unwrap_or(limits::DEFAULT_TIMEOUT_SECONDS);
    if !(1..=limits::MAX_TIMEOUT_SECONDS).contains(&timeout) {
        e.add(
            "timeout_seconds",
            format!("must be between 1 and {}", limits::MAX_TIMEOUT_SECONDS),
        );
    }
    let retry = req.retry.clone().unwrap_or(RetryRequest {
        max_attempts: 1,
        backoff_seconds: 0,
        exit_codes: vec![],
        on_timeout: false,
    });
    if retry.exit_codes.len() > limits::MAX_EXIT_CODES
        || retry.exit_codes.iter().any(|c| !(1..=255).contains(c))
    {
        e.add(
            "retry.exit_codes",
            format!("at most {} exit codes, each 1-255", limits::MAX_EXIT_CODES),
        );
    }
    if !(1..=limits::MAX_ATTEMPTS).contains(&retry.max_attempts) {
        e.add(
            "retry.max_attempts",
            format!("must be between 1 and {}", limits::MAX_ATTEMPTS),
        );
    }
    if !(0..=limits::MAX_BACKOFF_SECONDS).contains(&retry.backoff_seconds) {
        e.add(
            "retry.backoff_seconds",
            format!("must be between 0 and {}", limits::MAX_BACKOFF_SECONDS),
        );
    }
    let queue = req
        .queue
        .clone()
        .unwrap_or_else(ud_schemas::spec::default_queue);
    if let Err(f) = queue_name("queue", &queue) {
        e.0.push(f);
    }
    if req.inputs.len() > limits::MAX_FILES {
        e.add("inputs", format!("more than {} inputs", limits::MAX_FILES));
    }
    for (i, input) in req.inputs.iter().enumerate() {
        if let Err(reason) = ud_schemas::spec::InputSource::parse(&input.source) {
            e.add(
                format!("inputs[{i}].source"),
                format!("{:?} {reason}", input.source),
            );
        }
        if let Err(reason) = ud_schemas::spec::relative_path(&input.path) {
            e.add(
                format!("inputs[{i}].path"),
                format!(
                    "{:?} {reason}: it must stay inside the workspace",
                    input.path
                ),
            );
        }
    }
    if req.outputs.len() > limits::MAX_FILES {
        e.add(
            "outputs",
            format!("more than {} outputs", limits::MAX_FILES),
        );
    }
    for (i, path) in req.outputs.iter().enumerate() {
        if let Err(reason) = ud_schemas::spec::relative_path(path) {
            e.add(
                format!("outputs[{i}]"),
                format!("{path:?} {reason}: it must stay inside the workspace"),
            );
        }
    }
    if !(0..=limits::MAX_GPU_MEMORY_MB).contains(&r.gpu_memory_mb) {
        e.add(
            "resources.gpu_memory_mb",
            format!("must be between 0 and {}", limits::MAX_GPU_MEMORY_MB),
        );
    }
    for (field, v) in [
        (
            "resources.gpu_compute_capability",
            &r.gpu_compute_capability,
        ),
        ("resources.gpu_driver", &r.gpu_driver),
    ] {
        if v.as_deref().is_some_and(|v| !dotted_version(v)) {
            e.add(field, "a version of dotted numbers, e.g. 8.0 or 535.104");
        }
    }
    let network = req.network.unwrap_or_default();
    if let Some(shm) = req.shm_size_mb {
        if !(1..=limits::MAX_SHM_MB).contains(&shm) {
            e.add(
                "shm_size_mb",
                format!("must be between 1 and {}", limits::MAX_SHM_MB),
            );
        }
    }
    if req.secrets.len() > limits::MAX_SECRETS {
        e.add(
            "secrets",
            format!("more than {} secrets", limits::MAX_SECRETS),
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, name) in req.secrets.iter().enumerate() {
        if let Err(f) = secret_name(&format!("secrets[{i}]"), name) {
            e.0.push(f);
        } else if !seen.insert(name) {
            e.add(format!("secrets[{i}]"), format!("{name} is named twice"));
        } else if req.env.contains_key(name) {
            e.add(
                format!("secrets[{i}]"),
                format!("{name} is also set in env: give it one value"),
            );
        }
    }
    let checkpoint = req.checkpoint.as_ref().map(|c| {
        if let Err(f) = relative_path("checkpoint.path", &c.path) {
            e.0.push(f);
        }
        let every = c
            .every_seconds
            .unwrap_or(limits::DEFAULT_CHECKPOINT_SECONDS);
        if !(limits::MIN_CHECKPOINT_SECONDS..=limits::MAX_CHECKPOINT_SECONDS).contains(&every) {
            e.add(
                "checkpoint.every_seconds",
                format!(
                    "must be between {} and {}",
                    limits::MIN_CHECKPOINT_SECONDS,
                    limits::MAX_CHECKPOINT_SECONDS
                ),
            );
        }
        let from = match c
            .resume_from
            .as_deref()
            .map(str::parse::<ud_schemas::TaskId>)
        {
            Some(Ok(id)) => Some(id),
            Some(Err(_)) => {
                e.add("checkpoint.resume_from", "is not a task id");
                None
            }
            None => None,
        };
        ud_schemas::spec::Checkpoint {
            path: c.path.trim_end_matches('/').to_owned(),
            every_seconds: every.unsigned_abs(),
            from,
        }
    });
    if let Some(store) = &req.store {
        if !ud_schemas::spec::short_name(store) {
            e.add(
                "store",
                format!("{store:?}: use 1-63 of a-z, 0-9, '-' and '_'"),
            );
        }
    }
    if req.after.len() > limits::MAX_AFTER {
        e.add("after", format!("at most {} tasks", limits::MAX_AFTER));
    }
    let mut after: Vec<ud_schemas::spec::After> = Vec::new();
    for (i, a) in req.after.iter().enumerate() {
        let when = match a.when.as_deref() {
            None | Some("success") => ud_schemas::spec::AfterWhen::Success,
            Some("any") => ud_schemas::spec::AfterWhen::Any,
            Some(_) => {
                e.add(format!("after[{i}].when"), "must be success or any");
                continue;
            }
        };
        match a.task.parse::<ud_schemas::TaskId>() {
            Ok(task) if after.iter().any(|b| b.task == task) => {
                e.add(format!("after[{i}].task"), "is named twice");
            }
            Ok(task) => after.push(ud_schemas::spec::After { task, when }),
            Err(_) => e.add(format!("after[{i}].task"), "is not a task id"),
        }
    }
    if let Some(s) = req.lost_after_seconds {
        if !(0..=limits::MAX_LOST_AFTER_SECONDS).contains(&s) {
            e.add(
                "lost_after_seconds",
                format!("must be between 0 and {}", limits::MAX_LOST_AFTER_SECONDS),
            );
        }
    }
    let (ports, session) = ports_and_session(&mut e, req);
    let priority = req.priority.unwrap_or(0);
    if let Err(f) = priority_value(priority) {
        e.0.push(f);
    }
    match (e.0.is_empty(), project, code_commit, env_commit) {
        (true, Ok(project), Some(code_commit_id), Some(env_commit_id)) => Ok((
            project,
            TaskSpec {
                name: req.name.clone(),
                code_repo_url: req.code_repo_url.clone(),
                code_commit_id,
                env_repo_url: req.env_repo_url.clone(),
                env_commit_id,
                dockerfile_path: req.dockerfile_path.clone(),
                command: req.command.clone(),
                args: req.args.clone(),
                env: req.env.clone(),
                resources: Resources {
                    // In range by the checks above.
                    cpu_millis: (r.cpus * 1000.0).round() as u32,
                    memory_mb: r.memory_mb.unsigned_abs(),
                    gpus: u32::try_from(r.gpus).unwrap_or(0),
                    gpu_model: r.gpu_model.clone(),
                    labels: r.labels.clone(),
                    preferred_labels: r.preferred_labels.clone(),
                    disk_mb: r.disk_mb.unsigned_abs(),
                    gpu_memory_mb: r.gpu_memory_mb.unsigned_abs(),
                    gpu_compute_capability: r.gpu_compute_capability.clone(),
                    gpu_driver: r.gpu_driver.clone(),
                    gpu_shared: r.gpu_shared,
                    network,
                    preferred_nodes: Vec::new(),
                },
                timeout_seconds: timeout.unsigned_abs(),
                retry: RetryPolicy {
                    max_attempts: u32::try_from(retry.max_attempts).unwrap_or(1),
                    backoff_seconds: u32::try_from(retry.backoff_seconds).unwrap_or(0),
                    exit_codes: retry
                        .exit_codes
                        .iter()
                        .filter_map(|c| i32::try_from(*c).ok())
                        .collect(),
                    on_timeout: retry.on_timeout,
                },
                priority: i32::try_from(priority).unwrap_or(0),
                queue,
                inputs: req.inputs.clone(),
                outputs: req
                    .outputs
                    .iter()
                    .map(|p| p.trim_end_matches('/').to_owned())
                    .collect(),
                shm_size_mb: req.shm_size_mb.map(i64::unsigned_abs),
                secrets: req.secrets.clone(),
                checkpoint,
                lost_after_seconds: req.lost_after_seconds.map(i64::unsigned_abs),
                after,
                shared: None,
                store: req.store.clone(),
                ports,
                session,
                image: req.image.clone(),
            },
        )),
        _ => Err(e.0),
    }
}

fn port_value(e: &mut Errors, field: String, p: i64) -> Option<u16> {
    match u16::try_from(p) {
        Ok(p) if p > 0 => Some(p),
        _ => {
            e.add(field, format!("{p} is not a TCP port (1-65535)"));
            None
        }
    }
}

/// The declared ports (the session's among them) and the session, whose
/// id the command path draws after validation (empty here).
fn ports_and_session(
    e: &mut Errors,
    req: &SubmitTask,
) -> (Vec<u16>, Option<ud_schemas::spec::Session>) {
    let mut ports: Vec<u16> = Vec::new();
    if req.ports.len() > limits::MAX_PORTS {
        e.add("ports", format!("at most {} ports", limits::MAX_PORTS));
    }
    for (i, p) in req.ports.iter().enumerate() {
        match port_value(e, format!("ports[{i}]"), *p) {
            Some(p) if ports.contains(&p) => e.add(format!("ports[{i}]"), "is named twice"),
            Some(p) => ports.push(p),
            None => {}
        }
    }
    let session = req.session.as_ref().and_then(|s| {
        let port = port_value(e, "session.port".into(), s.port)?;
        let idle = s
            .idle_timeout_minutes
            .unwrap_or(limits::DEFAULT_SESSION_IDLE_MINUTES as f64);
        if !(0.0..=limits::MAX_SESSION_IDLE_MINUTES as f64).contains(&idle) {
            e.add(
                "session.idle_timeout_minutes",
                format!("must be between 0 and {}", limits::MAX_SESSION_IDLE_MINUTES),
            );
            return None;
        }
        if !ports.contains(&port) {
            ports.push(port);
        }
        Some(ud_schemas::spec::Session {
            id: String::new(),
            port,
            // In range by the check above.
            idle_timeout_seconds: (idle * 60.0).round() as u64,
        })
    });
    (ports, session)
}

pub fn idempotency_key(key: &str) -> Result<(), FieldError> {
    let ok = !key.is_empty()
        && key.len() <= limits::MAX_IDEMPOTENCY_KEY_BYTES
        && key.bytes().all(|b| (0x21..0x7f).contains(&b));
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            "Idempotency-Key",
            "must be 1-255 printable ASCII characters without spaces",
        ))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    pub(crate) fn request() -> SubmitTask {
        SubmitTask {
            project: "lab".into(),
            name: None,
            code_repo_url: "https://example.org/code.git".into(),
            code_commit_id: "A".repeat(40),
            env_repo_url: "file:///srv/env".into(),
            env_commit_id: "b".repeat(64),
            dockerfile_path: "envs/gpu/Dockerfile".into(),
            command: vec!["python".into(), "train.py".into()],
            args: vec![],
            env: BTreeMap::new(),
            resources: ResourceRequest::default(),
            timeout_seconds: None,
            retry: None,
            priority: None,
            queue: None,
            inputs: vec![],
            outputs: vec![],
            network: None,
            shm_size_mb: None,
            secrets: vec![],
            checkpoint: None,
            lost_after_seconds: None,
            after: vec![],
            store: None,
            ports: vec![],
            session: None,
            image: None,
        }
    }

    #[test]
    fn an_image_names_the_environment_instead_of_an_env_repository() {
        let mut r = request();
        r.image = Some("registry.example.org:5000/team/pytorch:2.4-cuda12".into());
        assert_eq!(fields(r.clone()), vec!["image"], "env fields given too");
        r.env_repo_url.clear();
        r.env_commit_id.clear();
        r.dockerfile_path.clear();
        let (_, spec) = submit_task(&r).expect("an image alone is an environment");
        assert_eq!(spec.image.as_deref(), r.image.as_deref());
        assert_eq!(spec.env_commit_id, "");
        assert_eq!(
            submit_task(&rerun_request(&r.project, ud_schemas::TaskId::new(), &spec))
                .map(|(_, s)| s.image),
            Ok(spec.image.clone()),
            "a rerun keeps the image"
        );
        r.image = None;
        assert_eq!(
            fields(r),
            vec!["env_repo_url", "env_commit_id", "dockerfile_path"],
            "no image and no env repository"
        );
    }

    #[test]
    fn image_references() {
        for ok in [
            "busybox",
            "busybox:1.36",
            "library/busybox:latest",
            "nvcr.io/nvidia/pytorch:24.05-py3",
            "localhost:5000/x/y",
        ] {
            assert!(image_ref("i", ok).is_ok(), "{ok}");
        }
        let pinned = format!("ghcr.io/team/env:1@sha256:{}", "a".repeat(64));
        assert!(image_ref("i", &pinned).is_ok());
        for bad in [
            "",
            "Busybox",
            "busy box",
            "x:",
            "x:-tag",
            "x@sha256:abc",
            "-x",
            "x//y",
            "host:port/x",
            "x:1@md5",
        ] {
            assert!(image_ref("i", bad).is_err(), "{bad}");
        }
    }

    fn fields(r: SubmitTask) -> Vec<String> {
        submit_task(&r)
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|f| f.field)
            .collect()
    }

    #[test]
    fn ports_and_sessions() {
        let mut r = request();
        r.ports = vec![6006];
        r.session = Some(ud_schemas::api::SessionRequest {
            port: 8888,
            idle_timeout_minutes: None,
        });
        let (_, spec) = submit_task(&r).unwrap_or_else(|e| unreachable!("{e:?}"));
        assert_eq!(spec.ports, vec![6006, 8888]);
        let session = spec.session.clone().unwrap_or_else(|| unreachable!());
        assert_eq!((session.port, session.idle_timeout_seconds), (8888, 3600));
        // A rerun asks for the same ports and session again.
        let again = rerun_request("lab", ud_schemas::TaskId::new(), &spec);
        let (_, respec) = submit_task(&again).unwrap_or_else(|e| unreachable!("{e:?}"));
        assert_eq!((respec.ports, respec.session), (spec.ports, spec.session));
        r.ports = vec![0, 70000, 22, 22];
        r.session = Some(ud_schemas::api::SessionRequest {
            port: -1,
            idle_timeout_minutes: Some(-5.0),
        });
        assert_eq!(
            fields(r.clone()),
            ["ports[0]", "ports[1]", "ports[3]", "session.port"]
        );
        r.ports = vec![];
        r.session = Some(ud_schemas::api::SessionRequest {
            port: 8888,
            idle_timeout_minutes: Some(-5.0),
        });
        assert_eq!(fields(r), ["session.idle_timeout_minutes"]);
    }

    #[test]
    fn valid_request() {
        let (project, spec) = submit_task(&request()).unwrap_or_else(|e| unreachable!("{e:?}"));
        assert_eq!(project.as_str(), "lab");
        assert_eq!(spec.code_commit_id, "a".repeat(40));
        assert_eq!(spec.resources.cpu_millis, 1000);
        assert_eq!(spec.timeout_seconds, 86400);
    }

    #[test]
    fn text_that_cannot_be_stored_or_sent_is_refused() {
        let mut r = request();
        r.name = Some("a\0b".into());
        r.resources.gpu_model = Some("A100\n".into());
        r.resources.labels.insert("zone".into(), "eu\0".into());
        r.env.insert("X".into(), "\0".into());
        assert_eq!(
            fields(r),
            vec![
                "name",
                "env.X",
                "resources.gpu_model",
                "resources.labels.zone"
            ]
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let mut r = request();
        r.code_repo_url = "ftp://x/y".into();
        r.env_commit_id = "abc".into();
        r.dockerfile_path = "../Dockerfile".into();
        r.resources.memory_mb = -5;
        r.resources.cpus = f64::NAN;
        r.command = vec![];
        assert_eq!(
            fields(r),
            vec![
                "code_repo_url",
                "env_commit_id",
                "dockerfile_path",
                "command",
                "resources.cpus",
                "resources.memory_mb"
            ]
        );
    }

    #[test]
    fn files_stay_inside_the_workspace() {
        let mut r = request();
        r.inputs = vec![
            ud_schemas::spec::TaskInput {
                source: "data/train.csv".into(),
                path: "data/train.csv".into(),
            },
            ud_schemas::spec::TaskInput {
                source: "/etc/passwd".into(),
                path: "../../x".into(),
            },
        ];
        r.outputs = vec!["results/".into(), "../escape".into(), "/abs".into()];
        assert_eq!(
            fields(r.clone()),
            vec![
                "inputs[1].source",
                "inputs[1].path",
                "outputs[1]",
                "outputs[2]"
            ]
        );
        r.inputs.truncate(1);
        r.outputs.truncate(1);
        let (_, spec) = submit_task(&r).unwrap_or_else(|e| unreachable!("{e:?}"));
        assert_eq!(spec.outputs, vec!["results".to_owned()]);
    }

    #[test]
    fn repo_urls() {
        for ok in [
            "https://git.example.org/a/b.git",
            "http://127.0.0.1:8080/code.git",
            "ssh://git@host:2222/x.git",
            "git://h/x",
            "file:///srv/env",
        ] {
            assert!(repo_url("u", ok).is_ok(), "{ok}");
        }
        for bad in [
            "https://user:secret@h/x.git",
            "https://token@h/x.git",
            "ssh://git:pw@h/x",
            "ftp://h/x",
            "https://h",
            "https:///x",
            "file://",
            "h/x",
        ] {
            assert!(repo_url("u", bad).is_err(), "{bad}");
        }
        let p = parse_repo_url("ssh://git@host:2222/x.git");
        assert_eq!(
            p.map(|p| (p.user, p.host, p.path)),
            Some((Some("git"), "host:2222", "/x.git"))
        );
    }

    #[test]
    fn paths() {
        assert!(relative_path("p", "a/b/Dockerfile").is_ok());
        assert!(relative_path("p", "/etc/passwd").is_err());
        assert!(relative_path("p", "a/../../b").is_err());
        assert!(relative_path("p", "").is_err());
    }

    proptest! {
        #[test]
        fn never_panics_and_accepts_only_in_range(cpus in proptest::num::f64::ANY, mem in any::<i64>(), gpus in any::<i64>(), timeout in any::<i64>()) {
            let mut r = request();
            r.resources.cpus = cpus;
            r.resources.memory_mb = mem;
            r.resources.gpus = gpus;
            r.timeout_seconds = Some(timeout);
            if let Ok((_, spec)) = submit_task(&r) {
                prop_assert!(spec.resources.cpu_millis >= 1 && cpus >= 0.001);
                prop_assert!(spec.resources.memory_mb as i64 == mem && mem >= 1);
                prop_assert!(spec.resources.gpus as i64 == gpus);
                prop_assert!(spec.timeout_seconds as i64 == timeout);
            }
        }

        #[test]
        fn a_rerun_validates_to_the_same_spec(cpus in 1u32..64_000, mem in 1i64..1_000_000, gpus in 0i64..8,
            timeout in 1i64..86_400, attempts in 1i64..5, backoff in 0i64..600, prio in -1000i64..1000,
            codes in proptest::collection::vec(1i64..255, 0..3), disk in 0i64..100_000, on_timeout in any::<bool>(),
            checkpoint in any::<bool>()) {
            let mut r = request();
            r.resources.cpus = f64::from(cpus) / 1000.0;
            r.resources.memory_mb = mem;
            r.resources.gpus = gpus;
            r.resources.disk_mb = disk;
            r.timeout_seconds = Some(timeout);
            r.priority = Some(prio);
            r.retry = Some(RetryRequest { max_attempts: attempts, backoff_seconds: backoff, exit_codes: codes, on_timeout });
            r.outputs = vec!["out/".into()];
            r.checkpoint = checkpoint.then(|| CheckpointRequest { path: "ckpt/".into(), every_seconds: Some(60), resume_from: None });
            let (project, spec) = submit_task(&r).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
            let first = ud_schemas::TaskId::new();
            let again = submit_task(&rerun_request(project.as_str(), first, &spec))
                .map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
            prop_assert_eq!(again.0.as_str(), project.as_str());
            // The same spec, its checkpoint going on from the first task's.
            let mut expected = spec.clone();
            if let Some(c) = expected.checkpoint.as_mut() {
                c.from = Some(first);
            }
            prop_assert_eq!(&again.1, &expected);
            // A rerun of the rerun still reads the first task's checkpoint.
            let third = submit_task(&rerun_request(project.as_str(), ud_schemas::TaskId::new(), &again.1))
                .map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
            prop_assert_eq!(third.1, expected);
        }

        #[test]
        fn commit_ids(s in "[0-9a-fA-F]{40}|[0-9a-f]{64}|[0-9a-z]{0,70}") {
            let ok = commit_id("c", &s).is_ok();
            prop_assert_eq!(ok, (s.len() == 40 || s.len() == 64) && s.chars().all(|c| c.is_ascii_hexdigit()));
        }
    }
}
