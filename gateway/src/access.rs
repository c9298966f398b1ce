//! Who may call each operation of the API: the one table the handlers'
//! checks follow, published in the OpenAPI document as `x-unidesk-access`
//! on every operation. A test calls every operation of the document with a
//! token of each role and expects 403 exactly below the role named here.

use serde::Serialize;
use ud_schemas::Role;
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::path::Operation;
use utoipa::Modify;

/// What an operation needs of its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// No token.
    Public,
    /// Any valid token; the answer holds what the caller may see.
    Signed,
    /// At least this role in the project the operation is about (the
    /// project in its path, body, or of the task, pipeline or schedule it
    /// names). Members change only their own tasks.
    Viewer,
    Member,
    Owner,
    /// An admin token.
    Admin,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Public => "public",
            Self::Signed => "signed",
            Self::Viewer => "viewer",
            Self::Member => "member",
            Self::Owner => "owner",
            Self::Admin => "admin",
        }
    }

    /// The project role it needs, if it is about a project.
    pub fn role(self) -> Option<Role> {
        match self {
            Self::Viewer => Some(Role::Viewer),
            Self::Member => Some(Role::Member),
            Self::Owner => Some(Role::Owner),
            _ => None,
        }
    }
}

use Access::*;

/// (method, path as in the OpenAPI document, access).
pub const RULES: &[(&str, &str, Access)] = &[
    ("get", "/readyz", Public),
    ("get", "/api/v1/auth", Public),
    // Tasks
    ("post", "/api/v1/tasks", Member),
    ("get", "/api/v1/tasks", Signed),
    ("get", "/api/v1/tasks/{id}", Viewer),
    ("get", "/api/v1/tasks/{id}/events", Viewer),
    ("get", "/api/v1/tasks/{id}/logs", Viewer),
    ("post", "/api/v1/tasks/{id}/cancel", Member),
    ("post", "/api/v1/tasks/{id}/priority", Member),
    ("post", "/api/v1/tasks/{id}/rerun", Member),
    ("post", "/api/v1/projects/{project}/cancel", Owner),
    ("post", "/api/v1/queues/{queue}/cancel", Signed),
    // Sessions
    ("post", "/api/v1/tasks/{id}/session", Member),
    ("get", "/api/v1/tasks/{id}/exec", Member),
    ("get", "/api/v1/tasks/{id}/ports/{port}", Member),
    // Pipelines and schedules
    ("post", "/api/v1/pipelines", Member),
    ("get", "/api/v1/pipelines", Signed),
    ("get", "/api/v1/pipelines/{id}", Viewer),
    ("post", "/api/v1/pipelines/{id}/cancel", Member),
    ("post", "/api/v1/pipelines/{id}/rerun", Member),
    ("post", "/api/v1/schedules", Member),
    ("get", "/api/v1/schedules", Signed),
    ("get", "/api/v1/schedules/{id}", Viewer),
    ("post", "/api/v1/schedules/{id}/pause", Member),
    ("post", "/api/v1/schedules/{id}/resume", Member),
    ("delete", "/api/v1/schedules/{id}", Member),
    // Projects
    ("post", "/api/v1/projects", Admin),
    ("get", "/api/v1/projects", Signed),
    ("get", "/api/v1/projects/{project}", Viewer),
    ("put", "/api/v1/projects/{project}/members/{user}", Owner),
    ("delete", "/api/v1/projects/{project}/members/{user}", Owner),
    ("post", "/api/v1/projects/{project}/archive", Admin),
    // Files
    ("get", "/api/v1/projects/{project}/stores", Viewer),
    ("get", "/api/v1/projects/{project}/files", Viewer),
    ("get", "/api/v1/projects/{project}/files/{path}", Viewer),
    ("post", "/api/v1/projects/{project}/uploads", Member),
    (
        "get",
        "/api/v1/projects/{project}/uploads/{upload_id}",
        Member,
    ),
    (
        "post",
        "/api/v1/projects/{project}/uploads/{upload_id}/complete",
        Member,
    ),
    (
        "delete",
        "/api/v1/projects/{project}/uploads/{upload_id}",
        Member,
    ),
    // Secrets, webhooks, quotas
    ("get", "/api/v1/secrets", Signed),
    ("get", "/api/v1/projects/{project}/secrets", Viewer),
    ("put", "/api/v1/projects/{project}/secrets/{name}", Owner),
    ("delete", "/api/v1/projects/{project}/secrets/{name}", Owner),
    ("post", "/api/v1/projects/{project}/webhooks", Owner),
    ("get", "/api/v1/projects/{project}/webhooks", Viewer),
    (
        "delete",
        "/api/v1/projects/{project}/webhooks/{name}",
        Owner,
    ),
    (
        "get",
        "/api/v1/projects/{project}/webhooks/{name}/deliveries",
        Viewer,
    ),
    ("get", "/api/v1/quotas", Signed),
    ("get", "/api/v1/projects/{project}/quota", Viewer),
    ("put", "/api/v1/projects/{project}/quota", Admin),
    ("delete", "/api/v1/projects/{project}/quota", Admin),
    // Queues, nodes, tokens, the rest
    ("get", "/api/v1/queues", Signed),
    ("put", "/api/v1/queues/{queue}", Admin),
    ("delete", "/api/v1/queues/{queue}", Admin),
    ("get", "/api/v1/nodes", Signed),
    ("get", "/api/v1/nodes/{id}", Signed),
    ("post", "/api/v1/nodes", Admin),
    ("post", "/api/v1/nodes/{id}/revoke", Admin),
    ("post", "/api/v1/nodes/{id}/cordon", Admin),
    ("post", "/api/v1/nodes/{id}/drain", Admin),
    ("post", "/api/v1/nodes/{id}/resume", Admin),
    ("post", "/api/v1/tokens", Admin),
    ("get", "/api/v1/tokens", Signed),
    ("delete", "/api/v1/tokens/{id}", Signed),
    ("get", "/api/v1/live", Signed),
    ("get", "/api/v1/stats", Signed),
];

/// The access an operation needs, if the table has it.
pub fn rule(method: &str, path: &str) -> Option<Access> {
    RULES
        .iter()
        .find(|(m, p, _)| m.eq_ignore_ascii_case(method) && *p == path)
        .map(|(_, _, a)| *a)
}

/// Writes each operation's access into the document.
pub struct Rules;

impl Modify for Rules {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            let ops: [(&str, &mut Option<Operation>); 4] = [
                ("get", &mut item.get),
                ("post", &mut item.post),
                ("put", &mut item.put),
                ("delete", &mut item.delete),
            ];
            for (method, op) in ops {
                let (Some(op), Some(access)) = (op.as_mut(), rule(method, path)) else {
                    continue;
                };
                let mut ext: Extensions = [("x-unidesk-access", access.as_str())]
                    .into_iter()
                    .collect();
                if let Some(old) = op.extensions.take() {
                    ext.merge(old);
                }
                op.extensions = Some(ext);
            }
        }
    }
}
