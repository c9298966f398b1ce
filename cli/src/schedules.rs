//! `unidesk schedule`: a task or pipeline submitted at the times of a cron
//! expression in a time zone.

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::client::{task_body, Api, ApiArgs, SubmitArgs};
use crate::output;

#[derive(Subcommand)]
pub enum ScheduleCommand {
    /// Create a schedule of a task (the flags of `unidesk submit`, or
    /// --file) or of a pipeline file (--pipeline).
    Create(Box<CreateArgs>),
    /// Schedules, newest first.
    Ls(ListArgs),
    /// One schedule: its next time and how its last one went.
    Show(IdArgs),
    /// Submit nothing until resumed; the times meanwhile are not run later.
    Pause(PauseArgs),
    /// Resume a paused schedule from its next time.
    Resume(IdArgs),
    /// Submit nothing more (it stays readable).
    Delete(IdArgs),
}

#[derive(Args)]
pub struct CreateArgs {
    /// The schedule's name: 1-63 of a-z, 0-9, "-" and "_".
    schedule: String,
    /// When: five fields (minute hour day-of-month month day-of-week), six
    /// with seconds first, or @daily, @hourly, ...
    #[arg(long)]
    cron: String,
    /// The IANA time zone the expression is read in.
    #[arg(long, default_value = "UTC")]
    timezone: String,
    /// What becomes of the times that passed while no main server ran:
    /// skip or catch_up.
    #[arg(long, default_value = "skip")]
    missed: String,
    /// A pipeline file (YAML or JSON) to submit instead of a task.
    #[arg(long)]
    pipeline: Option<std::path::PathBuf>,
    #[command(flatten)]
    task: SubmitArgs,
}

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[arg(long)]
    project: Option<String>,
    /// Deleted schedules too.
    #[arg(long)]
    deleted: bool,
}

#[derive(Args)]
pub struct IdArgs {
    #[command(flatten)]
    api: ApiArgs,
    id: String,
}

#[derive(Args)]
pub struct PauseArgs {
    #[command(flatten)]
    api: ApiArgs,
    id: String,
    #[arg(long)]
    reason: Option<String>,
}

fn accepted(v: &Value) -> String {
    format!(
        "schedule {} (stream sequence {})\n",
        v["schedule_id"].as_str().unwrap_or_default(),
        v["seq"]
    )
}

pub async fn run(c: ScheduleCommand) -> Result<()> {
    match c {
        ScheduleCommand::Create(a) => {
            let mut body = json!({
                "name": a.schedule,
                "cron": a.cron,
                "timezone": a.timezone,
                "missed": a.missed,
            });
            match &a.pipeline {
                Some(path) => body["pipeline"] = crate::pipelines::read_file(path, None)?,
                None => body["task"] = task_body(&a.task)?,
            }
            let args = a.task.api().clone();
            let as_json = args.json;
            let v = Api::new(args)
                .post("/api/v1/schedules?wait=projected", &body)
                .await?;
            if as_json {
                output::json(&v);
            } else {
                println!("{}", v["schedule_id"].as_str().unwrap_or_default());
            }
            Ok(())
        }
        ScheduleCommand::Ls(a) => {
            let mut query = vec![format!("deleted={}", a.deleted)];
            if let Some(p) = &a.project {
                query.push(format!("project={p}"));
            }
            let as_json = a.api.json;
            let v = Api::new(a.api)
                .get(&format!("/api/v1/schedules?{}", query.join("&")))
                .await?;
            output::either(as_json, &v, output::schedules);
            Ok(())
        }
        ScheduleCommand::Show(a) => {
            let as_json = a.api.json;
            let v = Api::new(a.api)
                .get(&format!("/api/v1/schedules/{}", a.id))
                .await?;
            output::either(as_json, &v, output::schedule);
            Ok(())
        }
        ScheduleCommand::Pause(a) => {
            let as_json = a.api.json;
            let v = Api::new(a.api)
                .post(
                    &format!("/api/v1/schedules/{}/pause?wait=projected", a.id),
                    &json!({"reason": a.reason}),
                )
                .await?;
            output::either(as_json, &v, accepted);
            Ok(())
        }
        ScheduleCommand::Resume(a) => {
            let as_json = a.api.json;
            let v = Api::new(a.api)
                .post(
                    &format!("/api/v1/schedules/{}/resume?wait=projected", a.id),
                    &Value::Null,
                )
                .await?;
            output::either(as_json, &v, accepted);
            Ok(())
        }
        ScheduleCommand::Delete(a) => {
            let as_json = a.api.json;
            let v = Api::new(a.api)
                .delete(&format!("/api/v1/schedules/{}?wait=projected", a.id))
                .await?;
            output::either(as_json, &v, accepted);
            Ok(())
        }
    }
}
