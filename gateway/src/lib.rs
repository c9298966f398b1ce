//! The UniDesk REST API (axum): tasks, nodes, tokens, the OpenAPI document.

pub mod access;
pub mod auth;
pub mod body;
pub mod error;
pub mod files;
pub mod health;
pub mod live;
pub mod nodes;
pub mod openapi;
pub mod paging;
pub mod pipelines;
pub mod projected;
pub mod projects;
pub mod queues;
pub mod quotas;
pub mod schedules;
pub mod secrets;
pub mod sessions;
pub mod sso;
pub mod stats;
pub mod tasks;
pub mod tokens;
pub mod ui;
pub mod webhooks;

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use ud_core::TaskCommands;
use ud_projections::Db;

pub use projected::Projected;

/// What every request handler shares. A handle: cloning it (axum does, for
/// each request) costs one reference count, not a copy of the settings.
#[derive(Clone)]
pub struct AppState(std::sync::Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(std::sync::Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct Shared {
    pub commands: TaskCommands,
    pub pipelines: ud_core::pipeline::commands::PipelineCommands,
    pub schedules: ud_core::schedule::commands::ScheduleCommands,
    pub db: Db,
    pub projected: Projected,
    /// The platform's object store and the projects' own.
    pub stores: ud_storage::Stores,
    /// The main server's disks to watch.
    pub disk: health::DiskWatch,
    /// Tokens recently looked up (see [`auth::TokenCache`]).
    pub tokens: auth::TokenCache,
    /// Whether this instance's ingest holds the pin (when it runs one).
    pub ingest_pinned: Option<ud_core::edge::ingest::Pinned>,
    /// What the main server's supervisor says of its services.
    pub services: health::ServiceStates,
    /// Tunnels to running tasks on their nodes.
    pub tunnels: ud_tunnel::Tunnels,
    /// Where sessions are served and how they are entered.
    pub sessions: sessions::SessionSettings,
    /// Running sessions recently looked up.
    pub session_targets: sessions::SessionTargets,
    /// Whether e-mail webhooks can be sent (an SMTP server is set).
    pub email: bool,
    /// Sign-in through an OpenID Connect provider, when set.
    pub oidc: Option<sso::Oidc>,
}

async fn healthz() -> &'static str {
    "ok"
}

async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi::document())
}

async fn fallback() -> error::ApiError {
    error::ApiError::not_found("route")
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/api/v1/openapi.json", get(openapi_json))
        .route("/api/v1/tasks", post(tasks::submit).get(tasks::list))
        .route("/api/v1/tasks/{id}", get(tasks::get))
        .route("/api/v1/tasks/{id}/events", get(tasks::history))
        .route("/api/v1/tasks/{id}/cancel", post(tasks::cancel))
        .route("/api/v1/tasks/{id}/priority", post(tasks::priority))
        .route("/api/v1/tasks/{id}/rerun", post(tasks::rerun))
        .route("/api/v1/tasks/{id}/session", post(sessions::link))
        .route("/api/v1/tasks/{id}/exec", get(sessions::exec))
        .route("/api/v1/tasks/{id}/ports/{port}", get(sessions::port))
        .route("/s/{session}", axum::routing::any(sessions::by_path))
        .route(
            "/s/{session}/{*rest}",
            axum::routing::any(sessions::by_path),
        )
        .route(
            "/api/v1/projects/{project}/cancel",
            post(tasks::cancel_project),
        )
        .route("/api/v1/queues/{queue}/cancel", post(tasks::cancel_queue))
        .route(
            "/api/v1/pipelines",
            post(pipelines::submit).get(pipelines::list),
        )
        .route("/api/v1/pipelines/{id}", get(pipelines::get))
        .route("/api/v1/pipelines/{id}/cancel", post(pipelines::cancel))
        .route("/api/v1/pipelines/{id}/rerun", post(pipelines::rerun))
        .route(
            "/api/v1/schedules",
            post(schedules::create).get(schedules::list),
        )
        .route(
            "/api/v1/schedules/{id}",
            get(schedules::get).delete(schedules::delete),
        )
        .route("/api/v1/schedules/{id}/pause", post(schedules::pause))
        .route("/api/v1/schedules/{id}/resume", post(schedules::resume))
        .route("/api/v1/queues", get(queues::list))
        .route(
            "/api/v1/queues/{queue}",
            axum::routing::put(queues::put).delete(queues::reset),
        )
        .route(
            "/api/v1/projects/{project}/webhooks",
            get(webhooks::list).post(webhooks::create),
        )
        .route(
            "/api/v1/projects/{project}/webhooks/{name}",
            delete(webhooks::delete),
        )
        .route(
            "/api/v1/projects/{project}/webhooks/{name}/deliveries",
            get(webhooks::deliveries),
        )
        .route("/api/v1/quotas", get(quotas::list))
        .route(
            "/api/v1/projects/{project}/quota",
            get(quotas::get).put(quotas::put).delete(quotas::reset),
        )
        .route("/api/v1/projects/{project}/files", get(files::list))
        .route("/api/v1/projects/{project}/stores", get(files::stores))
        .route(
            "/api/v1/projects/{project}/files/{*path}",
            get(files::download),
        )
        .route(
            "/api/v1/projects/{project}/uploads",
            post(files::start_upload),
        )
        .route(
            "/api/v1/projects/{project}/uploads/{upload_id}",
            get(files::resume_upload).delete(files::abort_upload),
        )
        .route(
            "/api/v1/projects/{project}/uploads/{upload_id}/complete",
            post(files::complete_upload),
        )
        .route("/api/v1/projects/{project}/secrets", get(secrets::list))
        .route(
            "/api/v1/projects/{project}/secrets/{name}",
            axum::routing::put(secrets::put).delete(secrets::delete),
        )
        .route("/api/v1/secrets", get(secrets::list_all))
        .route("/api/v1/nodes", get(nodes::list).post(nodes::enroll))
        .route("/api/v1/nodes/{id}", get(nodes::get))
        .route("/api/v1/nodes/{id}/revoke", post(nodes::revoke))
        .route("/api/v1/nodes/{id}/cordon", post(nodes::cordon))
        .route("/api/v1/nodes/{id}/drain", post(nodes::drain))
        .route("/api/v1/nodes/{id}/resume", post(nodes::resume))
        .route("/api/v1/tasks/{id}/logs", get(tasks::logs))
        .route("/api/v1/live", get(live::live))
        .route("/api/v1/stats", get(stats::stats))
        .route("/api/v1/tokens", post(tokens::issue).get(tokens::list))
        .route("/api/v1/auth", get(sso::methods))
        .route("/auth/login", get(sso::login))
        .route("/auth/callback", get(sso::callback))
        .route(
            "/api/v1/projects",
            post(projects::create).get(projects::list),
        )
        .route("/api/v1/projects/{project}", get(projects::get))
        .route(
            "/api/v1/projects/{project}/members/{user}",
            axum::routing::put(projects::set_member).delete(projects::remove_member),
        )
        .route(
            "/api/v1/projects/{project}/archive",
            post(projects::archive),
        )
        .route("/api/v1/tokens/{id}", delete(tokens::revoke))
        .merge(ui::router())
        .fallback(fallback)
        .layer(DefaultBodyLimit::max(body::MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            session_hosts,
        ))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// Requests to a session's own host go to the session, whatever their path.
async fn session_hosts(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if state.sessions.origin.is_none() {
        return next.run(req).await;
    }
    let host = req
        .headers()
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_ascii_lowercase);
    match host.and_then(|h| state.sessions.session_of_host(&h)) {
        Some(session) => sessions::serve(state, session, String::new(), req).await,
        None => next.run(req).await,
    }
}

/// Serves the API on `listener` until the future is dropped.
pub async fn serve(listener: tokio::net::TcpListener, state: AppState) -> std::io::Result<()> {
    axum::serve(listener, router(state)).await
}
