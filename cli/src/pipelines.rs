//! `unidesk pipeline`: submit a pipeline file, follow it, cancel, rerun.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::client::{Api, ApiArgs};
use crate::output;

#[derive(Subcommand)]
pub enum PipelineCommand {
    /// Submit a pipeline file (YAML or JSON; see docs/pipelines.md).
    Submit(SubmitArgs),
    /// Pipelines, newest first.
    Ls(ListArgs),
    /// One pipeline: each step's state and task.
    Show(ShowArgs),
    /// Cancel a pipeline: waiting steps are skipped, running ones cancelled.
    Cancel(CancelArgs),
    /// Run an ended pipeline again, or one step and every step after it.
    Rerun(RerunArgs),
}

#[derive(Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The pipeline file.
    file: std::path::PathBuf,
    /// The project (instead of the file's `project`).
    #[arg(long)]
    project: Option<String>,
    /// Wait for the pipeline's end, printing steps as they change; exits 1
    /// unless it succeeded.
    #[arg(long)]
    wait: bool,
}

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[arg(long)]
    project: Option<String>,
    /// running, succeeded, failed or cancelled.
    #[arg(long)]
    status: Option<String>,
    #[arg(long, default_value_t = 50)]
    limit: i64,
}

#[derive(Args)]
pub struct ShowArgs {
    #[command(flatten)]
    api: ApiArgs,
    id: String,
    /// Wait for the pipeline's end, printing steps as they change.
    #[arg(long)]
    wait: bool,
}

#[derive(Args)]
pub struct CancelArgs {
    #[command(flatten)]
    api: ApiArgs,
    id: String,
    #[arg(long)]
    reason: Option<String>,
}

#[derive(Args)]
pub struct RerunArgs {
    #[command(flatten)]
    api: ApiArgs,
    id: String,
    /// Only this step (and every step after it).
    #[arg(long)]
    step: Option<String>,
}

/// A pipeline file as the API's JSON body.
pub(crate) fn read_file(path: &std::path::Path, project: Option<&str>) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut body: Value = serde_yaml_ng::from_str(&text)
        .with_context(|| format!("{} is not a YAML or JSON document", path.display()))?;
    let Some(fields) = body.as_object_mut() else {
        bail!(
            "{}: a pipeline is a mapping (project, steps, ...)",
            path.display()
        );
    };
    if let Some(p) = project {
        fields.insert("project".into(), json!(p));
    }
    Ok(body)
}

pub async fn run(c: PipelineCommand) -> Result<()> {
    match c {
        PipelineCommand::Submit(a) => {
            let body = read_file(&a.file, a.project.as_deref())?;
            let as_json = a.api.json;
            let api = Api::new(a.api);
            let v = api.post("/api/v1/pipelines?wait=projected", &body).await?;
            let id = v["pipeline_id"].as_str().unwrap_or_default().to_owned();
            if as_json && !a.wait {
                output::json(&v);
            } else if !as_json {
                println!("{id}");
            }
            if a.wait {
                follow(&api, &id, as_json).await?;
            }
            Ok(())
        }
        PipelineCommand::Ls(a) => {
            let mut query = vec![format!("limit={}", a.limit)];
            if let Some(p) = &a.project {
                query.push(format!("project={p}"));
            }
            if let Some(s) = &a.status {
                query.push(format!("status={s}"));
            }
            let as_json = a.api.json;
            let v = Api::new(a.api)
                .get(&format!("/api/v1/pipelines?{}", query.join("&")))
                .await?;
            output::either(as_json, &v, output::pipelines);
            Ok(())
        }
        PipelineCommand::Show(a) => {
            let as_json = a.api.json;
            let api = Api::new(a.api);
            if a.wait {
                return follow(&api, &a.id, as_json).await;
            }
            let v = api.get(&format!("/api/v1/pipelines/{}", a.id)).await?;
            output::either(as_json, &v, output::pipeline);
            Ok(())
        }
        PipelineCommand::Cancel(a) => {
            let as_json = a.api.json;
            let body = match &a.reason {
                Some(r) => json!({ "reason": r }),
                None => json!({}),
            };
            let v = Api::new(a.api)
                .post(&format!("/api/v1/pipelines/{}/cancel", a.id), &body)
                .await?;
            output::either(as_json, &v, |_| format!("{} cancelling\n", a.id));
            Ok(())
        }
        PipelineCommand::Rerun(a) => {
            let as_json = a.api.json;
            let v = Api::new(a.api)
                .post(
                    &format!("/api/v1/pipelines/{}/rerun", a.id),
                    &json!({ "step": a.step }),
                )
                .await?;
            output::either(as_json, &v, |_| format!("{} running again\n", a.id));
            Ok(())
        }
    }
}

/// Prints the steps whenever they change until the pipeline ends; fails
/// unless it succeeded.
async fn follow(api: &Api, id: &str, as_json: bool) -> Result<()> {
    let mut last_version = -1;
    loop {
        let v = api.get(&format!("/api/v1/pipelines/{id}")).await?;
        let version = v["version"].as_i64().unwrap_or(0);
        if version != last_version && !as_json {
            print!("{}", output::pipeline(&v));
            last_version = version;
        }
        match v["status"].as_str() {
            Some("running") | None => tokio::time::sleep(Duration::from_secs(1)).await,
            Some("succeeded") => {
                if as_json {
                    output::json(&v);
                }
                return Ok(());
            }
            Some(other) => {
                if as_json {
                    output::json(&v);
                }
                bail!("pipeline {id} {other}");
            }
        }
    }
}
