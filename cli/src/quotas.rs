//! `unidesk quota`: what a project's tasks may hold at once and the
//! GPU-hours they may use a month, beside what they hold and used.

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::client::{Api, ApiArgs};
use crate::output;

#[derive(Subcommand)]
pub enum QuotaCommand {
    /// Projects with a quota or live tasks: limits and usage.
    Ls(ListArgs),
    /// One project's quota and usage.
    Show(ProjectArgs),
    /// Set a project's quota (admin); limits left out are no limits.
    Set(SetArgs),
    /// Drop a project's quota (admin).
    Reset(ProjectArgs),
}

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Args)]
pub struct ProjectArgs {
    #[command(flatten)]
    api: ApiArgs,
    project: String,
}

#[derive(Args)]
pub struct SetArgs {
    #[command(flatten)]
    api: ApiArgs,
    project: String,
    /// Most tasks assigned or running at once.
    #[arg(long, allow_hyphen_values = true)]
    tasks: Option<i64>,
    /// Most CPUs its live tasks hold at once (fractions allowed: 0.5).
    #[arg(long, allow_hyphen_values = true)]
    cpus: Option<f64>,
    /// Most memory, in MiB, its live tasks hold at once.
    #[arg(long, allow_hyphen_values = true)]
    memory_mb: Option<i64>,
    /// Most GPUs its live tasks hold at once.
    #[arg(long, allow_hyphen_values = true)]
    gpus: Option<i64>,
    /// GPU-hours its runs may use in a calendar month (UTC).
    #[arg(long, allow_hyphen_values = true)]
    gpu_hours: Option<i64>,
}

/// Quotas as a table: each limit as "used/limit".
fn table(list: &Value) -> String {
    // Whole numbers as such, others to a tenth.
    let num = |v: &Value| match v.as_f64() {
        Some(f) if (f * 10.0).round() % 10.0 == 0.0 => format!("{}", (f.round()) as i64),
        Some(f) => format!("{:.1}", f),
        None => "-".to_owned(),
    };
    let cell = |used: &Value, limit: &Value| match limit {
        Value::Null => num(used),
        l => format!("{}/{}", num(used), num(l)),
    };
    let cpus = |v: &Value| v.as_f64().map_or(Value::Null, |m| json!(m / 1000.0));
    let rows: Vec<Vec<String>> = list
        .as_array()
        .into_iter()
        .flatten()
        .map(|q| {
            let (u, l) = (&q["usage"], &q["quota"]);
            vec![
                q["project"].as_str().unwrap_or_default().to_owned(),
                cell(&u["tasks"], &l["max_tasks"]),
                cell(&cpus(&u["cpu_millis"]), &cpus(&l["max_cpu_millis"])),
                cell(&u["memory_mb"], &l["max_memory_mb"]),
                cell(&u["gpus"], &l["max_gpus"]),
                cell(&u["gpu_hours"], &l["gpu_hours_per_month"]),
                q["month"].as_str().unwrap_or_default().to_owned(),
            ]
        })
        .collect();
    output::table(
        &[
            "PROJECT",
            "TASKS",
            "CPUS",
            "MEMORY MB",
            "GPUS",
            "GPU-HOURS",
            "MONTH",
        ],
        &rows,
    )
}

pub async fn run(c: QuotaCommand) -> Result<()> {
    match c {
        QuotaCommand::Ls(a) => {
            let as_json = a.api.json;
            let v = Api::new(a.api).get("/api/v1/quotas").await?;
            output::either(as_json, &v, table);
        }
        QuotaCommand::Show(a) => {
            let as_json = a.api.json;
            let v = Api::new(a.api)
                .get(&format!("/api/v1/projects/{}/quota", a.project))
                .await?;
            output::either(as_json, &v, |v| table(&json!([v])));
        }
        QuotaCommand::Set(a) => {
            let cpu_millis = match a.cpus {
                Some(c) if !c.is_finite() => bail!("--cpus: not a number"),
                Some(c) => Some((c * 1000.0).round() as i64),
                None => None,
            };
            let body = json!({
                "max_tasks": a.tasks, "max_cpu_millis": cpu_millis,
                "max_memory_mb": a.memory_mb, "max_gpus": a.gpus,
                "gpu_hours_per_month": a.gpu_hours,
            });
            let as_json = a.api.json;
            let v = Api::new(a.api)
                .put(&format!("/api/v1/projects/{}/quota", a.project), &body)
                .await?;
            output::either(as_json, &v, |v| table(&json!([v])));
        }
        QuotaCommand::Reset(a) => {
            Api::new(a.api)
                .delete(&format!("/api/v1/projects/{}/quota", a.project))
                .await?;
        }
    }
    Ok(())
}
