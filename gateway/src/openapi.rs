//! The OpenAPI document, generated from the handlers and types.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::access::Rules;

use crate::{
    error, files, health, live, nodes, pipelines, projects, queues, quotas, schedules, secrets,
    sessions, sso, stats, tasks, tokens, webhooks,
};

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(c) = openapi.components.as_mut() {
            c.add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "UniDesk API", description = "Submit and follow tasks on UniDesk compute nodes. Every call needs `Authorization: Bearer <token>`; what each operation allows is its `x-unidesk-access` (public, signed, viewer, member, owner, admin). Errors share one JSON shape (`ErrorBody`)."),
    paths(tasks::submit, tasks::list, tasks::get, tasks::history, tasks::cancel, tasks::rerun, tasks::priority, tasks::cancel_project, tasks::cancel_queue, tasks::logs, nodes::list, nodes::get, nodes::enroll, nodes::revoke, nodes::cordon, nodes::drain, nodes::resume, tokens::issue, tokens::list, tokens::revoke, sso::methods,
        projects::create, projects::list, projects::get, projects::set_member, projects::remove_member, projects::archive,
        files::list, files::stores, files::download, files::start_upload, files::resume_upload, files::complete_upload, files::abort_upload, health::readyz, live::live, stats::stats, queues::list, queues::put, queues::reset, quotas::list, quotas::get, quotas::put, quotas::reset, webhooks::create, webhooks::list, webhooks::delete, webhooks::deliveries,
        secrets::put, secrets::delete, secrets::list, secrets::list_all,
        pipelines::submit, pipelines::list, pipelines::get, pipelines::cancel, pipelines::rerun,
        schedules::create, schedules::list, schedules::get, schedules::pause, schedules::resume, schedules::delete,
        sessions::link, sessions::exec, sessions::port),
    components(schemas(error::ErrorBody, ud_core::validate::FieldError, ud_core::validate::ResourceRequest, ud_core::validate::RetryRequest,
        ud_schemas::spec::Resources, ud_schemas::spec::RetryPolicy, ud_schemas::spec::TaskInput, live::Hello, live::Follow, live::Outgoing)),
    modifiers(&Bearer, &Rules),
    tags((name = "tasks"), (name = "pipelines", description = "Steps, each a task, that run once the steps they need have ended"), (name = "schedules", description = "A task or pipeline submitted at the times of a cron expression in a time zone"), (name = "nodes"), (name = "tokens", description = "API tokens: a person's carry that user's project roles, may expire, and show when they were last used"), (name = "projects", description = "Projects with members in roles: viewer reads, member also submits and changes its own tasks, owner also manages members, secrets, webhooks and anyone's tasks"), (name = "files"), (name = "queues"), (name = "webhooks", description = "Task events POSTed to a project's URL, signed (UniDesk-Signature), tried again with backoff, each delivery logged"), (name = "quotas", description = "Compute a project's tasks may hold at once and GPU-hours a month; a task over its quota waits"), (name = "secrets", description = "Project secrets, write-only: tasks get them as environment variables"), (name = "health"), (name = "live", description = "One WebSocket with the events a token may see; resumes from a stream sequence"), (name = "sessions", description = "Interactive work on running tasks through their node's link: a session's own origin, exec, port forwarding"))
)]
struct ApiDoc;

pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as pretty JSON (the committed `gateway/openapi.json`).
pub fn json() -> String {
    document().to_pretty_json().unwrap_or_default()
}
