//! Client commands: talk to the REST API with a bearer token.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::output;

#[derive(Args, Clone)]
pub struct ApiArgs {
    /// Base URL of the UniDesk API.
    #[arg(long, env = "UD_API_URL", default_value = "http://127.0.0.1:8080")]
    pub api_url: String,
    /// API token.
    #[arg(long, env = "UD_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Print the API's JSON (for scripts) instead of tables and summaries.
    #[arg(long)]
    pub json: bool,
}

pub(crate) struct Api {
    pub(crate) http: reqwest::Client,
    pub(crate) args: ApiArgs,
}

impl Api {
    pub(crate) fn new(args: ApiArgs) -> Self {
        Self {
            http: reqwest::Client::new(),
            args,
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{}", self.args.api_url.trim_end_matches('/'), path)
    }

    pub(crate) async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value> {
        let resp = req
            .bearer_auth(&self.args.token)
            .send()
            .await
            .with_context(|| format!("cannot reach the API at {}", self.args.api_url))?;
        let status = resp.status();
        let text = resp.text().await?;
        let body: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if !status.is_success() {
            let msg = body
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| body.to_string());
            bail!("{status}: {msg}");
        }
        Ok(body)
    }

    pub(crate) async fn get(&self, path: &str) -> Result<Value> {
        self.send(self.http.get(self.url(path))).await
    }

    pub(crate) async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    pub(crate) async fn put(&self, path: &str, body: &Value) -> Result<Value> {
        self.send(self.http.put(self.url(path)).json(body)).await
    }

    pub(crate) async fn delete(&self, path: &str) -> Result<Value> {
        self.send(self.http.delete(self.url(path))).await
    }
}

pub(crate) fn print(v: &Value) {
    crate::output::json(v);
}

/// `--input SOURCE[:PATH]` as (source, path): a source naming a task's
/// outputs (`task:<id>/model/`) keeps its prefix, and the path defaults to
/// the source's own path.
fn input_arg(arg: &str) -> (String, String) {
    let (prefix, rest) = match arg.strip_prefix("task:") {
        Some(rest) => ("task:", rest),
        None => ("", arg),
    };
    match rest.split_once(':') {
        Some((source, path)) => (format!("{prefix}{source}"), path.to_owned()),
        None if prefix.is_empty() => (arg.to_owned(), arg.to_owned()),
        None => {
            let own = rest.split_once('/').map_or("", |(_, p)| p);
            (arg.to_owned(), own.to_owned())
        }
    }
}

fn key_values(items: &[String], what: &str) -> Result<BTreeMap<String, String>> {
    items
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| anyhow!("{what} {kv:?} is not KEY=VALUE"))
        })
        .collect()
}

#[derive(Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// A JSON file with the whole task (the API's SubmitTask); flags then are ignored.
    #[arg(long)]
    file: Option<std::path::PathBuf>,
    #[arg(long)]
    project: Option<String>,
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    code_repo: Option<String>,
    #[arg(long)]
    code_commit: Option<String>,
    /// Defaults to the code repository.
    #[arg(long)]
    env_repo: Option<String>,
    /// Defaults to the code commit.
    #[arg(long)]
    env_commit: Option<String>,
    #[arg(long, default_value = "Dockerfile")]
    dockerfile: String,
    /// Run in this image, pulled from its registry (`name:tag`, best
    /// `name@sha256:...`), instead of building the environment.
    #[arg(long, conflicts_with_all = ["env_repo", "env_commit"])]
    image: Option<String>,
    #[arg(long)]
    cpus: Option<f64>,
    #[arg(long)]
    memory_mb: Option<i64>,
    #[arg(long)]
    gpus: Option<i64>,
    /// GPU family, as users write it (`A100`, `a100-80gb`, `RTX 4090`).
    #[arg(long)]
    gpu_model: Option<String>,
    /// Memory each GPU must have, MiB.
    #[arg(long)]
    gpu_memory_mb: Option<i64>,
    /// Lowest CUDA compute capability, e.g. 8.0.
    #[arg(long)]
    gpu_compute_capability: Option<String>,
    /// Lowest NVIDIA driver version, e.g. 535.
    #[arg(long)]
    gpu_driver: Option<String>,
    /// Share GPUs with other tasks that share (otherwise a GPU is the task's alone).
    #[arg(long)]
    gpu_shared: bool,
    /// `none` (the default) or `egress`: a private network to the outside,
    /// on nodes that allow it.
    #[arg(long)]
    network: Option<String>,
    /// Size of /dev/shm, MiB (default: half the memory, at most 16 GiB).
    #[arg(long)]
    shm_size_mb: Option<i64>,
    /// A project secret the run gets as an environment variable of its name (repeatable).
    #[arg(long = "secret")]
    secrets: Vec<String>,
    /// A workspace folder kept across attempts: uploaded while the run goes
    /// and at its end, put back before the next attempt starts.
    #[arg(long)]
    checkpoint: Option<String>,
    /// Seconds between checkpoint uploads (default 600).
    #[arg(long, requires = "checkpoint")]
    checkpoint_every: Option<i64>,
    /// Start from the checkpoint of this earlier task.
    #[arg(long, requires = "checkpoint")]
    resume_from: Option<String>,
    /// Seconds the run may stay `disconnected` when its node goes offline
    /// before the task is lost and placed anew (default: the platform's).
    #[arg(long)]
    lost_after_seconds: Option<i64>,
    /// Run after this task of the project has succeeded; `ID:any`: after it
    /// has ended, however (repeatable).
    #[arg(long = "after")]
    after: Vec<String>,
    /// Required node label, KEY=VALUE (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Environment variable, KEY=VALUE (repeatable).
    #[arg(long = "env")]
    env: Vec<String>,
    #[arg(long)]
    timeout_seconds: Option<i64>,
    #[arg(long)]
    max_attempts: Option<i64>,
    #[arg(long)]
    backoff_seconds: Option<i64>,
    /// Higher runs first (-1000 to 1000).
    #[arg(long, allow_hyphen_values = true)]
    priority: Option<i64>,
    /// The queue to wait in (default `default`).
    #[arg(long)]
    queue: Option<String>,
    /// A project file copied into the workspace before the run: SOURCE or
    /// SOURCE:PATH (SOURCE ending in '/': a whole folder; `task:<id>/PATH`:
    /// another task's outputs). Repeatable.
    #[arg(long = "input")]
    inputs: Vec<String>,
    /// A workspace path uploaded after the run (a folder: everything below it). Repeatable.
    #[arg(long = "output")]
    outputs: Vec<String>,
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Return once the task is in the read models.
    #[arg(long)]
    wait: bool,
    /// The command and its arguments (after `--`).
    #[arg(last = true)]
    command: Vec<String>,
}

pub(crate) fn task_body(a: &SubmitArgs) -> Result<Value> {
    if let Some(path) = &a.file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        return serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()));
    }
    let need = |v: &Option<String>, flag: &str| {
        v.clone()
            .ok_or_else(|| anyhow!("--{flag} is required (or --file)"))
    };
    let code_repo = need(&a.code_repo, "code-repo")?;
    let code_commit = need(&a.code_commit, "code-commit")?;
    let mut resources = serde_json::Map::new();
    if let Some(c) = a.cpus {
        resources.insert("cpus".into(), json!(c));
    }
    if let Some(m) = a.memory_mb {
        resources.insert("memory_mb".into(), json!(m));
    }
    if let Some(g) = a.gpus {
        resources.insert("gpus".into(), json!(g));
    }
    if let Some(g) = &a.gpu_model {
        resources.insert("gpu_model".into(), json!(g));
    }
    if let Some(m) = a.gpu_memory_mb {
        resources.insert("gpu_memory_mb".into(), json!(m));
    }
    if let Some(c) = &a.gpu_compute_capability {
        resources.insert("gpu_compute_capability".into(), json!(c));
    }
    if let Some(d) = &a.gpu_driver {
        resources.insert("gpu_driver".into(), json!(d));
    }
    if a.gpu_shared {
        resources.insert("gpu_shared".into(), json!(true));
    }
    resources.insert("labels".into(), json!(key_values(&a.labels, "--label")?));
    let mut body = json!({
        "project": need(&a.project, "project")?,
        "name": a.name,
        "code_repo_url": code_repo,
        "code_commit_id": code_commit,
        "command": a.command,
        "env": key_values(&a.env, "--env")?,
        "resources": resources,
    });
    match &a.image {
        Some(image) => body["image"] = json!(image),
        None => {
            body["env_repo_url"] = json!(a.env_repo.clone().unwrap_or_else(|| code_repo.clone()));
            body["env_commit_id"] =
                json!(a.env_commit.clone().unwrap_or_else(|| code_commit.clone()));
            body["dockerfile_path"] = json!(a.dockerfile);
        }
    }
    if let Some(t) = a.timeout_seconds {
        body["timeout_seconds"] = json!(t);
    }
    if let Some(m) = a.max_attempts {
        body["retry"] =
            json!({"max_attempts": m, "backoff_seconds": a.backoff_seconds.unwrap_or(0)});
    }
    if let Some(p) = a.priority {
        body["priority"] = json!(p);
    }
    if let Some(q) = &a.queue {
        body["queue"] = json!(q);
    }
    if !a.inputs.is_empty() {
        let inputs: Vec<Value> = a
            .inputs
            .iter()
            .map(|i| {
                let (source, path) = input_arg(i);
                json!({"source": source, "path": path})
            })
            .collect();
        body["inputs"] = json!(inputs);
    }
    if !a.outputs.is_empty() {
        body["outputs"] = json!(a.outputs);
    }
    if let Some(n) = &a.network {
        body["network"] = json!(n);
    }
    if let Some(m) = a.shm_size_mb {
        body["shm_size_mb"] = json!(m);
    }
    if !a.secrets.is_empty() {
        body["secrets"] = json!(a.secrets);
    }
    if let Some(path) = &a.checkpoint {
        body["checkpoint"] = json!({
            "path": path, "every_seconds": a.checkpoint_every, "resume_from": a.resume_from,
        });
    }
    if let Some(s) = a.lost_after_seconds {
        body["lost_after_seconds"] = json!(s);
    }
    if !a.after.is_empty() {
        body["after"] = a
            .after
            .iter()
            .map(|a| match a.split_once(':') {
                Some((task, when)) => json!({"task": task, "when": when}),
                None => json!({"task": a}),
            })
            .collect();
    }
    Ok(body)
}

pub async fn submit(a: SubmitArgs) -> Result<()> {
    let body = task_body(&a)?;
    let api = Api::new(a.api.clone());
    let mut req = api
        .http
        .post(api.url(if a.wait {
            "/api/v1/tasks?wait=projected"
        } else {
            "/api/v1/tasks"
        }))
        .json(&body);
    if let Some(k) = &a.idempotency_key {
        req = req.header("Idempotency-Key", k);
    }
    let v = api.send(req).await?;
    if a.api.json {
        print(&v);
    } else {
        println!("{}", v["task_id"].as_str().unwrap_or_default());
    }
    Ok(())
}

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[arg(long)]
    state: Option<String>,
    #[arg(long)]
    project: Option<String>,
    #[arg(long)]
    node: Option<String>,
    #[arg(long, default_value_t = 50)]
    limit: i64,
    /// Paging cursor from the previous page.
    #[arg(long)]
    before: Option<String>,
}

pub async fn list(a: ListArgs) -> Result<()> {
    let api = Api::new(a.api.clone());
    let mut q = vec![("limit", a.limit.to_string())];
    for (k, v) in [
        ("state", &a.state),
        ("project", &a.project),
        ("node", &a.node),
        ("before", &a.before),
    ] {
        if let Some(v) = v {
            q.push((k, v.clone()));
        }
    }
    let v = api
        .send(api.http.get(api.url("/api/v1/tasks")).query(&q))
        .await?;
    if a.api.json {
        print(&v);
        return Ok(());
    }
    println!(
        "{:<36}  {:<12}  {:<16}  {:<24}  NAME",
        "ID", "STATE", "PROJECT", "SUBMITTED"
    );
    for t in v["items"].as_array().into_iter().flatten() {
        println!(
            "{:<36}  {:<12}  {:<16}  {:<24}  {}",
            t["id"].as_str().unwrap_or_default(),
            t["state"].as_str().unwrap_or_default(),
            t["project"].as_str().unwrap_or_default(),
            t["submitted_at"].as_str().unwrap_or_default(),
            t["name"].as_str().unwrap_or_default()
        );
    }
    if let Some(next) = v["next"].as_str() {
        println!("more: --before {next}");
    }
    Ok(())
}

#[derive(Args)]
pub struct IdArgs {
    #[command(flatten)]
    api: ApiArgs,
    id: String,
}

impl IdArgs {
    pub(crate) fn api(&self) -> &ApiArgs {
        &self.api
    }

    pub(crate) fn id(&self) -> &str {
        &self.id
    }
}

impl SubmitArgs {
    pub(crate) fn api(&self) -> &ApiArgs {
        &self.api
    }
}

pub async fn show(a: IdArgs) -> Result<()> {
    let as_json = a.api.json;
    let api = Api::new(a.api);
    let v = api.get(&format!("/api/v1/tasks/{}", a.id)).await?;
    output::either(as_json, &v, output::task);
    Ok(())
}

pub async fn history(a: IdArgs) -> Result<()> {
    let as_json = a.api.json;
    let api = Api::new(a.api);
    let v = api.get(&format!("/api/v1/tasks/{}/events", a.id)).await?;
    output::either(as_json, &v, output::history);
    Ok(())
}

/// An id and an optional reason (cancel, cordon, drain, resume).
#[derive(Args)]
pub struct CancelArgs {
    #[command(flatten)]
    api: ApiArgs,
    id: String,
    #[arg(long)]
    reason: Option<String>,
}

pub async fn cancel(a: CancelArgs) -> Result<()> {
    let as_json = a.api.json;
    let api = Api::new(a.api);
    let v = api
        .post(
            &format!("/api/v1/tasks/{}/cancel", a.id),
            &json!({"reason": a.reason}),
        )
        .await?;
    output::either(as_json, &v, output::accepted("cancel asked for task"));
    Ok(())
}

#[derive(Subcommand)]
pub enum NodeCommand {
    /// List nodes.
    List(NodeListArgs),
    /// Show one node.
    Show(IdArgs),
    /// Enroll a node (admin); prints its token once.
    Enroll(EnrollArgs),
    /// Revoke a node (admin): its connection is closed and it cannot reconnect.
    Revoke(IdArgs),
    /// Cordon a node (admin): no new tasks; running ones go on.
    Cordon(CancelArgs),
    /// Drain a node (admin): no new tasks; running ones finish.
    Drain(CancelArgs),
    /// Put a cordoned or draining node back into service (admin).
    Resume(CancelArgs),
}

#[derive(Args)]
pub struct EnrollArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[arg(long)]
    name: String,
    /// KEY=VALUE (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
}

#[derive(Args)]
pub struct NodeListArgs {
    #[command(flatten)]
    api: ApiArgs,
}

pub async fn node(c: NodeCommand) -> Result<()> {
    match c {
        NodeCommand::List(a) => {
            let as_json = a.api.json;
            let v = Api::new(a.api).get("/api/v1/nodes").await?;
            output::either(as_json, &v, output::nodes);
        }
        NodeCommand::Show(a) => {
            let as_json = a.api.json;
            let v = Api::new(a.api)
                .get(&format!("/api/v1/nodes/{}", a.id))
                .await?;
            output::either(as_json, &v, output::node);
        }
        NodeCommand::Enroll(a) => {
            let api = Api::new(a.api);
            let v = api
                .post(
                    "/api/v1/nodes",
                    &json!({"name": a.name, "labels": key_values(&a.labels, "--label")?}),
                )
                .await?;
            println!("{}", v["token"].as_str().unwrap_or_default());
        }
        NodeCommand::Revoke(a) => {
            let api = Api::new(a.api);
            api.post(&format!("/api/v1/nodes/{}/revoke", a.id), &json!({}))
                .await?;
        }
        NodeCommand::Cordon(a) => scheduling(a, "cordon").await?,
        NodeCommand::Drain(a) => scheduling(a, "drain").await?,
        NodeCommand::Resume(a) => scheduling(a, "resume").await?,
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum QueueCommand {
    /// Cancel every unfinished task of a queue (that the token may see).
    Cancel(CancelArgs),
    /// Queues with settings or unfinished tasks.
    List(ListQueuesArgs),
    /// Set a queue's priority and limit (admin); applied at once.
    Set(SetQueueArgs),
    /// Drop a queue's settings (admin): back to UD_QUEUES_FILE or the defaults.
    Reset(ResetQueueArgs),
}

#[derive(Args)]
pub struct ListQueuesArgs {
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Args)]
pub struct SetQueueArgs {
    #[command(flatten)]
    api: ApiArgs,
    name: String,
    /// Queues of higher priority are considered first (-1000 to 1000).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    priority: i32,
    /// Most tasks of the queue assigned or running at once (none: no limit).
    #[arg(long)]
    max_running: Option<u32>,
    /// Seconds its runs stay `disconnected` when their node goes offline
    /// (none: the platform's default).
    #[arg(long)]
    lost_after_seconds: Option<u64>,
}

#[derive(Args)]
pub struct ResetQueueArgs {
    #[command(flatten)]
    api: ApiArgs,
    name: String,
}

/// Cancels every unfinished task of a project or queue (`what`: projects, queues).
pub(crate) async fn cancel_all(a: CancelArgs, what: &str) -> Result<()> {
    let as_json = a.api.json;
    let api = Api::new(a.api);
    let v = api
        .post(
            &format!("/api/v1/{what}/{}/cancel", a.id),
            &json!({"reason": a.reason}),
        )
        .await?;
    output::either(as_json, &v, |v| {
        format!(
            "cancel asked for {} tasks\n",
            v["cancelled"].as_array().map_or(0, Vec::len)
        )
    });
    Ok(())
}

pub async fn queue(c: QueueCommand) -> Result<()> {
    match c {
        QueueCommand::Cancel(a) => cancel_all(a, "queues").await,
        QueueCommand::List(a) => {
            let as_json = a.api.json;
            let v = Api::new(a.api).get("/api/v1/queues").await?;
            output::either(as_json, &v, output::queues);
            Ok(())
        }
        QueueCommand::Set(a) => {
            let as_json = a.api.json;
            let body = json!({
                "priority": a.priority, "max_running": a.max_running,
                "lost_after_seconds": a.lost_after_seconds,
            });
            let v = Api::new(a.api)
                .put(&format!("/api/v1/queues/{}", a.name), &body)
                .await?;
            output::either(as_json, &v, |v| output::queues(&json!([v])));
            Ok(())
        }
        QueueCommand::Reset(a) => {
            Api::new(a.api)
                .delete(&format!("/api/v1/queues/{}", a.name))
                .await?;
            Ok(())
        }
    }
}

async fn scheduling(a: CancelArgs, action: &str) -> Result<()> {
    let as_json = a.api.json;
    let api = Api::new(a.api);
    let v = api
        .post(
            &format!("/api/v1/nodes/{}/{action}", a.id),
            &json!({"reason": a.reason}),
        )
        .await?;
    output::either(as_json, &v, output::node);
    Ok(())
}

#[derive(Subcommand)]
pub enum SecretCommand {
    /// Set a project secret; the value is read from standard input (one
    /// trailing newline dropped). A new version when it is set already.
    Set(SecretArgs),
    /// Secrets of a project (or of every project the token may use): names
    /// and versions, never values.
    Ls(SecretListArgs),
    /// Delete a project secret.
    Rm(SecretArgs),
}

#[derive(Args)]
pub struct SecretArgs {
    #[command(flatten)]
    api: ApiArgs,
    project: String,
    /// Also the environment variable tasks get it as.
    name: String,
}

#[derive(Args)]
pub struct SecretListArgs {
    #[command(flatten)]
    api: ApiArgs,
    project: Option<String>,
}

pub async fn secret(c: SecretCommand) -> Result<()> {
    match c {
        SecretCommand::Set(a) => {
            use std::io::Read;
            let mut value = String::new();
            std::io::stdin()
                .read_to_string(&mut value)
                .context("cannot read the value from standard input")?;
            let value = value
                .strip_suffix('\n')
                .map(|v| v.strip_suffix('\r').unwrap_or(v))
                .unwrap_or(&value);
            let as_json = a.api.json;
            let v = Api::new(a.api)
                .put(
                    &format!("/api/v1/projects/{}/secrets/{}", a.project, a.name),
                    &json!({ "value": value }),
                )
                .await?;
            output::either(as_json, &v, |v| {
                format!(
                    "{}/{} version {}\n",
                    a.project,
                    v["name"].as_str().unwrap_or_default(),
                    v["version"]
                )
            });
            Ok(())
        }
        SecretCommand::Ls(a) => {
            let as_json = a.api.json;
            let path = match &a.project {
                Some(p) => format!("/api/v1/projects/{p}/secrets"),
                None => "/api/v1/secrets".into(),
            };
            let v = Api::new(a.api).get(&path).await?;
            output::either(as_json, &v, output::secrets);
            Ok(())
        }
        SecretCommand::Rm(a) => {
            let as_json = a.api.json;
            let v = Api::new(a.api)
                .delete(&format!(
                    "/api/v1/projects/{}/secrets/{}",
                    a.project, a.name
                ))
                .await?;
            output::either(as_json, &v, |v| {
                format!(
                    "{}/{} deleted (version {})\n",
                    a.project, a.name, v["version"]
                )
            });
            Ok(())
        }
    }
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Issue a token (needs an admin token); prints the secret once.
    Issue(TokenIssueArgs),
    /// Tokens: an admin's lists every one, a person's their own.
    Ls(TokenLsArgs),
    /// Revoke a token by its id, or by its name when one active token has it.
    Revoke(IdArgs),
}

#[derive(Args)]
pub struct TokenIssueArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[arg(long)]
    name: String,
    /// The person the token belongs to: it carries their project roles.
    #[arg(long)]
    user: Option<String>,
    /// Project a token without a user may use, as owner (repeatable).
    #[arg(long = "project")]
    projects: Vec<String>,
    #[arg(long)]
    admin: bool,
    /// Days until the token stops working (default: never).
    #[arg(long)]
    expires_in_days: Option<u32>,
}

#[derive(Args)]
pub struct TokenLsArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Also revoked and expired tokens.
    #[arg(long)]
    all: bool,
    /// Only this user's tokens (admins).
    #[arg(long)]
    user: Option<String>,
}

fn tokens(list: &Value) -> String {
    let text = |v: &Value| match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    let rows: Vec<Vec<String>> = list
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            let scope = if t["admin"].as_bool().unwrap_or(false) {
                "admin".to_owned()
            } else {
                t["projects"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            };
            vec![
                text(&t["name"]),
                text(&t["user"]),
                if scope.is_empty() {
                    "-".to_owned()
                } else {
                    scope
                },
                text(&t["last_used_at"]),
                text(&t["expires_at"]),
                if t["active"].as_bool().unwrap_or(false) {
                    "active"
                } else {
                    "revoked/expired"
                }
                .to_owned(),
                text(&t["id"]),
            ]
        })
        .collect();
    crate::output::table(
        &[
            "NAME",
            "USER",
            "SCOPE",
            "LAST USED",
            "EXPIRES",
            "STATE",
            "ID",
        ],
        &rows,
    )
}

pub async fn token(c: TokenCommand) -> Result<()> {
    match c {
        TokenCommand::Issue(a) => {
            let api = Api::new(a.api);
            let mut body = json!({"name": a.name, "projects": a.projects, "admin": a.admin});
            if let Some(u) = a.user {
                body["user"] = json!(u);
            }
            if let Some(d) = a.expires_in_days {
                body["expires_in_days"] = json!(d);
            }
            let v = api.post("/api/v1/tokens", &body).await?;
            println!("{}", v["token"].as_str().unwrap_or_default());
        }
        TokenCommand::Ls(a) => {
            let as_json = a.api.json;
            let mut path = format!("/api/v1/tokens?all={}", a.all);
            if let Some(u) = &a.user {
                path.push_str(&format!("&user={u}"));
            }
            let v = Api::new(a.api).get(&path).await?;
            crate::output::either(as_json, &v, tokens);
        }
        TokenCommand::Revoke(a) => {
            let api = Api::new(a.api);
            api.send(
                api.http
                    .delete(api.url(&format!("/api/v1/tokens/{}", a.id))),
            )
            .await?;
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum TaskCommand {
    /// Print a task's output; with -f keep following it.
    Logs(LogsArgs),
    /// Submit the exact same versions, command and resources again; prints the new task id.
    Rerun(IdArgs),
    /// Change a pending task's priority (higher runs first, -1000 to 1000).
    Priority(PriorityArgs),
    /// List what a task's last run left in the object store; --download fetches it.
    Outputs(crate::files::OutputsArgs),
    /// Run a command in a running task's container (default: a shell with
    /// a terminal); exits with its code.
    Exec(crate::interactive::ExecArgs),
    /// Reach a port the task declared (`ports`) on this machine, e.g.
    /// TensorBoard: `unidesk task port-forward ID 6006`.
    PortForward(crate::interactive::PortForwardArgs),
}

#[derive(Args)]
pub struct PriorityArgs {
    #[command(flatten)]
    api: ApiArgs,
    id: String,
    #[arg(allow_hyphen_values = true)]
    priority: i64,
}

#[derive(Args)]
pub struct LogsArgs {
    #[command(flatten)]
    api: ApiArgs,
    id: String,
    /// Follow new output until the task ends.
    #[arg(short, long)]
    follow: bool,
}

pub async fn task(c: TaskCommand) -> Result<()> {
    match c {
        TaskCommand::Outputs(a) => crate::files::outputs(a).await,
        TaskCommand::Exec(a) => crate::interactive::exec(a).await,
        TaskCommand::PortForward(a) => crate::interactive::port_forward(a).await,
        TaskCommand::Priority(a) => {
            let as_json = a.api.json;
            let api = Api::new(a.api);
            let v = api
                .post(
                    &format!("/api/v1/tasks/{}/priority?wait=projected", a.id),
                    &json!({"priority": a.priority}),
                )
                .await?;
            output::either(as_json, &v, output::accepted("priority changed for task"));
            Ok(())
        }
        TaskCommand::Rerun(a) => {
            let api = Api::new(a.api.clone());
            let v = api
                .post(&format!("/api/v1/tasks/{}/rerun", a.id), &json!({}))
                .await?;
            if a.api.json {
                print(&v);
            } else {
                println!("{}", v["task_id"].as_str().unwrap_or_default());
            }
            Ok(())
        }
        TaskCommand::Logs(a) => {
            let api = Api::new(a.api);
            let mut after = 0u64;
            loop {
                let wait = if a.follow { 20 } else { 0 };
                let page = api
                    .get(&format!(
                        "/api/v1/tasks/{}/logs?after={after}&wait={wait}",
                        a.id
                    ))
                    .await?;
                for l in page["lines"].as_array().into_iter().flatten() {
                    let text = l["text"].as_str().unwrap_or_default();
                    if l["stream"] == "stderr" {
                        eprint!("{text}");
                    } else {
                        print!("{text}");
                    }
                }
                after = page["next"].as_u64().unwrap_or(after);
                if !a.follow {
                    return Ok(());
                }
                let t = api.get(&format!("/api/v1/tasks/{}", a.id)).await?;
                let done = matches!(
                    t["state"].as_str(),
                    Some("succeeded" | "failed" | "timed_out" | "cancelled")
                );
                if done && page["lines"].as_array().is_none_or(|l| l.is_empty()) {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::input_arg;

    #[test]
    fn inputs_name_files_or_task_outputs_and_where_they_go() {
        let pair = |a: &str, b: &str| (a.to_owned(), b.to_owned());
        assert_eq!(input_arg("data/a.csv"), pair("data/a.csv", "data/a.csv"));
        assert_eq!(input_arg("data/:in/"), pair("data/", "in/"));
        let t = "task:0190a5a4-0000-7000-8000-000000000001";
        assert_eq!(
            input_arg(&format!("{t}/model/")),
            pair(&format!("{t}/model/"), "model/")
        );
        assert_eq!(
            input_arg(&format!("{t}/model/:m/")),
            pair(&format!("{t}/model/"), "m/")
        );
    }
}
