//! `unidesk project`: projects, their members and roles.

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::client::{Api, ApiArgs};
use crate::output;

#[derive(Subcommand)]
pub enum ProjectCommand {
    /// Make a project with its first owner (admin).
    Create(CreateArgs),
    /// The projects you may see, with your role in each.
    Ls(ApiOnly),
    /// A project and its members.
    Show(ProjectArgs),
    /// Add a member or change a member's role (owners): viewer reads,
    /// member also submits and changes its own tasks, owner manages.
    Member(MemberArgs),
    /// Take a member out of a project (owners).
    Remove(RemoveArgs),
    /// Archive a project (admin): its members read, no one writes.
    Archive(ProjectArgs),
    /// Cancel every unfinished task of a project (owners).
    Cancel(crate::client::CancelArgs),
}

#[derive(Args)]
pub struct ApiOnly {
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Args)]
pub struct CreateArgs {
    #[command(flatten)]
    api: ApiArgs,
    name: String,
    /// The user who owns it first.
    #[arg(long)]
    owner: String,
    #[arg(long, default_value = "")]
    description: String,
}

#[derive(Args)]
pub struct ProjectArgs {
    #[command(flatten)]
    api: ApiArgs,
    project: String,
}

#[derive(Args)]
pub struct MemberArgs {
    #[command(flatten)]
    api: ApiArgs,
    project: String,
    user: String,
    /// viewer, member or owner.
    role: String,
}

#[derive(Args)]
pub struct RemoveArgs {
    #[command(flatten)]
    api: ApiArgs,
    project: String,
    user: String,
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

fn projects(list: &Value) -> String {
    let rows: Vec<Vec<String>> = list
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            vec![
                text(&p["name"]),
                text(&p["your_role"]),
                p["members"].as_array().map_or(0, Vec::len).to_string(),
                if p["archived_at"].is_null() {
                    "active"
                } else {
                    "archived"
                }
                .to_owned(),
                text(&p["description"]),
            ]
        })
        .collect();
    output::table(
        &["NAME", "YOUR ROLE", "MEMBERS", "STATE", "DESCRIPTION"],
        &rows,
    )
}

fn members(p: &Value) -> String {
    let rows: Vec<Vec<String>> = p["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| vec![text(&m["user"]), text(&m["role"]), text(&m["since"])])
        .collect();
    format!(
        "project {} ({}){}\n{}",
        text(&p["name"]),
        if p["archived_at"].is_null() {
            "active"
        } else {
            "archived"
        },
        match p["description"].as_str() {
            Some(d) if !d.is_empty() => format!(": {d}"),
            _ => String::new(),
        },
        output::table(&["USER", "ROLE", "SINCE"], &rows)
    )
}

pub async fn run(c: ProjectCommand) -> Result<()> {
    match c {
        ProjectCommand::Create(a) => {
            let as_json = a.api.json;
            let body = json!({"name": a.name, "owner": a.owner, "description": a.description});
            let v = Api::new(a.api).post("/api/v1/projects", &body).await?;
            output::either(as_json, &v, members);
        }
        ProjectCommand::Ls(a) => {
            let as_json = a.api.json;
            let v = Api::new(a.api).get("/api/v1/projects").await?;
            output::either(as_json, &v, projects);
        }
        ProjectCommand::Show(a) => {
            let as_json = a.api.json;
            let v = Api::new(a.api)
                .get(&format!("/api/v1/projects/{}", a.project))
                .await?;
            output::either(as_json, &v, members);
        }
        ProjectCommand::Member(a) => {
            let as_json = a.api.json;
            let v = Api::new(a.api)
                .put(
                    &format!("/api/v1/projects/{}/members/{}", a.project, a.user),
                    &json!({"role": a.role}),
                )
                .await?;
            output::either(as_json, &v, members);
        }
        ProjectCommand::Remove(a) => {
            Api::new(a.api)
                .delete(&format!(
                    "/api/v1/projects/{}/members/{}",
                    a.project, a.user
                ))
                .await?;
        }
        ProjectCommand::Cancel(a) => crate::client::cancel_all(a, "projects").await?,
        ProjectCommand::Archive(a) => {
            Api::new(a.api)
                .post(
                    &format!("/api/v1/projects/{}/archive", a.project),
                    &json!({}),
                )
                .await?;
        }
    }
    Ok(())
}
