//! Interactive work on running tasks, through the node's tunnel: a
//! session's port at an origin of its own (a wildcard host such as
//! `https://<session id>.s.example.org`, or `/s/<session id>/` on the
//! platform's own origin where no wildcard certificate exists), a shell in
//! a task (`exec`) and a port of a task forwarded to the user's machine.
//!
//! A session is entered with a short-lived signed link (made for a caller
//! who may see the task) that is exchanged for an HttpOnly cookie valid on
//! the session's origin only. Requests into the session never carry the
//! platform's Authorization header or its cookies; WebSocket upgrades must
//! come from the session's own origin.

use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info_span, warn, Instrument};
use ud_schemas::spec::{session_id, TaskSpec};
use ud_schemas::{NodeId, TaskId, TaskStatus};
use ud_tunnel::{Control, TunnelError};
use utoipa::{IntoParams, ToSchema};

use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::AppState;

/// The cookie a session's origin is entered with.
pub const COOKIE: &str = "ud_session";
/// Where a link is exchanged for the cookie, on the session's origin.
pub const ENTER_PATH: &str = "/_ud/session";
/// How long a link may be used.
pub const LINK_TTL: Duration = Duration::from_secs(60);
/// How long the cookie lets its holder in.
pub const COOKIE_TTL: Duration = Duration::from_secs(12 * 3600);

/// Where sessions are served, and the key links and cookies are signed with.
#[derive(Clone)]
pub struct SessionSettings {
    /// `https://{id}.s.example.org[:port]`: sessions at hosts of their own;
    /// `None`: under `/s/<id>/` of the platform's origin.
    pub origin: Option<OriginTemplate>,
    key: [u8; 32],
}

impl SessionSettings {
    /// `origin` as `UD_SESSION_ORIGIN` gives it; `key`: the signing key
    /// every main server shares (none: one drawn for this process).
    pub fn new(origin: Option<&str>, key: Option<[u8; 32]>) -> Result<Self, String> {
        let origin = origin.map(OriginTemplate::parse).transpose()?;
        let key = key.unwrap_or_else(|| {
            warn!(
                "no UD_SESSION_KEY_FILE: session links work only on the main server that made them"
            );
            rand::random()
        });
        Ok(Self { origin, key })
    }
}

impl std::fmt::Debug for SessionSettings {
    /// Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionSettings")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl Default for SessionSettings {
    /// Sessions under `/s/<id>/`, signed with a key of this process.
    fn default() -> Self {
        Self {
            origin: None,
            key: rand::random(),
        }
    }
}

impl SessionSettings {
    fn mac(&self, kind: &str, session: &str, expires: i64) -> Hmac<sha2::Sha256> {
        let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        m.update(format!("{kind}|{session}|{expires}").as_bytes());
        m
    }

    /// A token of `kind` for `session`, valid until `expires` (ms).
    pub fn sign(&self, kind: &str, session: &str, expires: i64) -> String {
        let mac = self.mac(kind, session, expires).finalize().into_bytes();
        format!("{expires}.{}", hex::encode(mac))
    }

    /// Whether `token` is a token of `kind` for `session` not yet expired
    /// (compared in constant time).
    pub fn verify(&self, kind: &str, session: &str, token: &str, now: i64) -> bool {
        let Some((expires, mac)) = token.split_once('.') else {
            return false;
        };
        match (expires.parse::<i64>(), hex::decode(mac)) {
            (Ok(expires), Ok(mac)) if expires >= now => {
                self.mac(kind, session, expires).verify_slice(&mac).is_ok()
            }
            _ => false,
        }
    }

    /// The origin a session is served at (host mode), e.g.
    /// `https://<id>.s.example.org`.
    pub fn origin_of(&self, session: &str) -> Option<String> {
        self.origin
            .as_ref()
            .map(|o| format!("{}{session}{}", o.scheme_prefix, o.suffix))
    }

    /// The session a request's Host names (host mode). A template without
    /// a port matches the host on any port.
    pub fn session_of_host(&self, host: &str) -> Option<String> {
        let o = self.origin.as_ref()?;
        let host = match o.suffix.contains(':') {
            true => host,
            false => host.rsplit_once(':').map_or(host, |(h, _)| h),
        };
        let id = host.strip_suffix(&o.suffix)?;
        session_id(id).then(|| id.to_owned())
    }

    /// Whether a request's `Origin` is the session's own (its scheme, and a
    /// host naming the same session).
    pub fn own_origin(&self, session: &str, origin: &str) -> bool {
        let Some(o) = &self.origin else {
            return false;
        };
        origin
            .strip_prefix(&o.scheme_prefix)
            .and_then(|host| self.session_of_host(&host.to_ascii_lowercase()))
            .is_some_and(|s| s == session)
    }
}

/// `scheme://{id}<suffix>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OriginTemplate {
    /// `https://`.
    pub scheme_prefix: String,
    /// `.s.example.org:8443`: the rest of the host, and its port.
    pub suffix: String,
}

impl OriginTemplate {
    pub fn parse(t: &str) -> Result<Self, String> {
        let err = || {
            format!(
                "UD_SESSION_ORIGIN {t:?}: give it as https://{{id}}.sessions.example.org[:port]"
            )
        };
        let (scheme, rest) = t.split_once("://").ok_or_else(err)?;
        if scheme != "https" && scheme != "http" {
            return Err(err());
        }
        let suffix = rest.strip_prefix("{id}").ok_or_else(err)?;
        let suffix = suffix.strip_suffix('/').unwrap_or(suffix);
        if !suffix.starts_with('.') || suffix.contains(['/', '{', '}', '@']) || suffix.len() < 3 {
            return Err(err());
        }
        Ok(Self {
            scheme_prefix: format!("{scheme}://"),
            suffix: suffix.to_ascii_lowercase(),
        })
    }

    pub fn secure(&self) -> bool {
        self.scheme_prefix == "https://"
    }
}

/// A link into a session.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct SessionLink {
    /// Open it in a browser within a minute: it sets the session's cookie
    /// and goes on to the session (relative to the platform's origin when
    /// sessions are served under `/s/<id>/`).
    pub url: String,
    /// The session's own address (without the sign-in step).
    pub session_url: String,
    /// When the link stops working (RFC 3339).
    pub expires_at: String,
}

/// Where a running session's requests go.
#[derive(Clone, Copy)]
struct Target {
    task: TaskId,
    node: NodeId,
    port: u16,
}

/// Running sessions by id, as last read from the read model: a page's many
/// requests cost one lookup, not one each. An ended session answers from
/// here for at most [`TARGET_TTL`]; its node then refuses the tunnel.
#[derive(Clone)]
pub struct SessionTargets(moka::sync::Cache<String, Target>);

pub const TARGET_TTL: Duration = Duration::from_secs(2);

impl Default for SessionTargets {
    fn default() -> Self {
        Self(
            moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(TARGET_TTL)
                .build(),
        )
    }
}

impl SessionTargets {
    async fn find(&self, state: &AppState, session: &str) -> Result<Target, ApiError> {
        if let Some(t) = self.0.get(session) {
            return Ok(t);
        }
        let row = {
            let client = state.db.client().await?;
            ud_projections::db::get_task_by_session(&client, session).await?
        }
        .ok_or_else(|| ApiError::not_found("session"))?;
        let task = row.id;
        let run = running(row)?;
        let port = run
            .spec
            .session
            .map(|s| s.port)
            .ok_or_else(|| ApiError::not_found("session"))?;
        let target = Target {
            task,
            node: run.node,
            port,
        };
        self.0.insert(session.to_owned(), target);
        Ok(target)
    }
}

/// A running task that tunnels may reach: its node and spec.
struct Running {
    node: NodeId,
    spec: TaskSpec,
}

fn running(row: ud_projections::rows::TaskRow) -> Result<Running, ApiError> {
    if row.state != TaskStatus::Running {
        return Err(ApiError::invalid_state(format!(
            "the task is {}, not running",
            row.state.as_str()
        )));
    }
    let node = row
        .node_id
        .ok_or_else(|| ApiError::invalid_state("the task has no node"))?;
    let spec: TaskSpec = serde_json::from_value(row.spec)
        .map_err(|e| ApiError::unavailable(format!("a stored spec does not read: {e}")))?;
    Ok(Running { node, spec })
}

async fn task_for(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<(TaskId, Running), ApiError> {
    let row = crate::tasks::visible(state, caller, id).await?;
    // Into a task's container: members their own tasks', owners anyone's.
    caller.require_own(
        "task",
        &row.project,
        &row.submitted_by,
        ud_schemas::Role::Member,
    )?;
    Ok((row.id, running(row)?))
}

fn tunnel_error(e: TunnelError) -> ApiError {
    match e {
        TunnelError::Refused(r) => ApiError::new(StatusCode::BAD_GATEWAY, "tunnel_refused", r),
        TunnelError::NoAnswer(_) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "node_unreachable",
            e.to_string(),
        ),
        TunnelError::Nats(_) => ApiError::unavailable(e),
    }
}

/// A link into a running session, for a caller who may see it.
#[utoipa::path(post, path = "/api/v1/tasks/{id}/session", tag = "sessions",
    responses((status = 200, body = SessionLink), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn link(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<SessionLink>, ApiError> {
    let (_, task) = task_for(&state, &caller, &id).await?;
    let session = task
        .spec
        .session
        .ok_or_else(|| ApiError::invalid_state("the task is not a session"))?;
    let expires = ud_schemas::now_millis() + LINK_TTL.as_millis() as i64;
    let token = state.sessions.sign("link", &session.id, expires);
    let base = match state.sessions.origin_of(&session.id) {
        Some(origin) => origin,
        None => format!("/s/{}", session.id),
    };
    Ok(Json(SessionLink {
        url: format!("{base}{ENTER_PATH}?token={token}"),
        session_url: format!("{base}/"),
        expires_at: chrono::DateTime::from_timestamp_millis(expires)
            .unwrap_or_default()
            .to_rfc3339(),
    }))
}

/// Serves a request for a session (host mode: its Host named the
/// session; path mode: `/s/<id>/...`).
pub async fn serve(state: AppState, session: String, prefix: String, req: Request) -> Response {
    match proxy(&state, &session, &prefix, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// The path of a session in path mode (`rest` is the session's own path).
#[derive(Deserialize)]
pub struct SessionPath {
    session: String,
}

/// Path mode: `/s/{session}/{*rest}`.
pub async fn by_path(
    State(state): State<AppState>,
    Path(SessionPath { session }): Path<SessionPath>,
    req: Request,
) -> Response {
    // Where sessions have hosts of their own, they are served nowhere else.
    if !session_id(&session) || state.sessions.origin.is_some() {
        return ApiError::not_found("session").into_response();
    }
    let prefix = format!("/s/{session}");
    serve(state, session, prefix, req).await
}

fn cookie_of(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// The request's headers as the session gets them: without the platform's
/// Authorization header and cookies.
fn forwarded_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    out.remove(header::AUTHORIZATION);
    out.remove(header::COOKIE);
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|c| !c.is_empty() && !c.starts_with("ud_"))
        .map(str::to_owned)
        .collect();
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
            out.insert(header::COOKIE, v);
        }
    }
    out
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

async fn proxy(
    state: &AppState,
    session: &str,
    prefix: &str,
    mut req: Request,
) -> Result<Response, ApiError> {
    let now = ud_schemas::now_millis();
    let secure = state
        .sessions
        .origin
        .as_ref()
        .is_some_and(OriginTemplate::secure);
    let path = req.uri().path().to_owned();
    let cookie_path = if prefix.is_empty() {
        "/".to_owned()
    } else {
        format!("{prefix}/")
    };
    // The link: exchanged for the cookie, then on to the session.
    if path == format!("{prefix}{ENTER_PATH}") {
        let token = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")))
            .unwrap_or_default();
        if !state.sessions.verify("link", session, token, now) {
            return Ok(text(
                StatusCode::UNAUTHORIZED,
                "This link has expired or is not valid: open the session again from UniDesk.",
            ));
        }
        let expires = now + COOKIE_TTL.as_millis() as i64;
        let value = state.sessions.sign("cookie", session, expires);
        let cookie = format!(
            "{COOKIE}={value}; Path={cookie_path}; Max-Age={}; HttpOnly; SameSite=Lax{}",
            COOKIE_TTL.as_secs(),
            if secure { "; Secure" } else { "" }
        );
        return Ok(Response::builder()
            .status(StatusCode::SEE_OTHER)
            .header(header::LOCATION, cookie_path)
            .header(header::SET_COOKIE, cookie)
            .header(header::CACHE_CONTROL, "no-store")
            .body(Body::empty())
            .unwrap_or_default());
    }
    let signed_in = cookie_of(req.headers(), COOKIE)
        .is_some_and(|c| state.sessions.verify("cookie", session, &c, now));
    if !signed_in {
        return Ok(text(
            StatusCode::UNAUTHORIZED,
            "Open this session from UniDesk (its task page, or `unidesk session open`).",
        ));
    }
    let upgrade = req.headers().contains_key(header::UPGRADE);
    if upgrade {
        // Only the session's own pages may open its WebSockets.
        let origin = req
            .headers()
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok());
        let own = match state.sessions.origin {
            Some(_) => origin.is_some_and(|o| state.sessions.own_origin(session, o)),
            // Path mode: the platform's own origin, as the Host names it.
            None => {
                let host = req
                    .headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok());
                match (origin, host) {
                    (Some(o), Some(h)) => o.split_once("://").map(|(_, rest)| rest) == Some(h),
                    _ => false,
                }
            }
        };
        if !own {
            return Ok(text(
                StatusCode::FORBIDDEN,
                "A WebSocket into a session must come from the session's own pages (Origin).",
            ));
        }
    }
    let Target {
        task: task_id,
        node,
        port,
    } = state.session_targets.find(state, session).await?;
    let span = info_span!("session", task_id = %task_id, node_id = %node);
    async move {
        let tunnel = state
            .tunnels
            .open(node, task_id, ud_tunnel::Target::Port(port))
            .await
            .map_err(tunnel_error)?;
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let io = hyper_util::rt::TokioIo::new(tunnel.stream);
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Body>(io)
            .await
            .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "session_error", e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(error = %e, "session connection ended");
            }
        });
        let (parts, body) = req.into_parts();
        let mut out = hyper::Request::builder()
            .method(parts.method)
            .uri(parts.uri.path_and_query().map_or("/", |p| p.as_str()))
            .version(hyper::Version::HTTP_11)
            .body(body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))?;
        *out.headers_mut() = forwarded_headers(&parts.headers);
        let mut resp = sender
            .send_request(out)
            .await
            .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "session_error", e.to_string()))?;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let server_side = hyper::upgrade::on(&mut resp);
            if let Some(client_side) = client_upgrade {
                tokio::spawn(async move {
                    if let (Ok(c), Ok(s)) = (client_side.await, server_side.await) {
                        let mut c = hyper_util::rt::TokioIo::new(c);
                        let mut s = hyper_util::rt::TokioIo::new(s);
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
                    }
                });
            }
        }
        let (parts, body) = resp.into_parts();
        let mut r = Response::from_parts(parts, Body::new(body));
        // The session may not set cookies on the platform's names.
        let theirs: Vec<HeaderValue> = r
            .headers()
            .get_all(header::SET_COOKIE)
            .iter()
            .filter(|v| !v.to_str().is_ok_and(|s| s.trim_start().starts_with("ud_")))
            .cloned()
            .collect();
        r.headers_mut().remove(header::SET_COOKIE);
        for v in theirs {
            r.headers_mut().append(header::SET_COOKIE, v);
        }
        Ok(r)
    }
    .instrument(span)
    .await
}

/// What `exec` runs.
#[derive(Deserialize, IntoParams)]
pub struct ExecParams {
    /// The command as a JSON array, e.g. `["sh"]` (default `["sh"]`).
    pub command: Option<String>,
    /// Give it a terminal (default true).
    pub tty: Option<bool>,
    pub cols: Option<u16>,
    pub rows: Option<u16>,
}

/// A command in a running task's container, over a WebSocket: binary
/// messages carry its input and output (an empty one ends the input); text
/// messages carry
/// `{"resize":{"cols":C,"rows":R}}` to it and `{"exit":{"code":N}}` from
/// it, before the socket closes.
#[utoipa::path(get, path = "/api/v1/tasks/{id}/exec", tag = "sessions", params(ExecParams),
    responses((status = 101, description = "WebSocket"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 502, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn exec(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(p): Query<ExecParams>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let command: Vec<String> = match &p.command {
        Some(c) => serde_json::from_str(c)
            .map_err(|_| ApiError::field("command", "must be a JSON array of strings"))?,
        None => vec!["sh".into()],
    };
    if command.is_empty() {
        return Err(ApiError::field("command", "must name a program"));
    }
    let (task_id, task) = task_for(&state, &caller, &id).await?;
    let target = ud_tunnel::Target::Exec {
        command,
        tty: p.tty.unwrap_or(true),
        cols: p.cols.unwrap_or(80),
        rows: p.rows.unwrap_or(24),
    };
    let tunnel = state
        .tunnels
        .open(task.node, task_id, target)
        .await
        .map_err(tunnel_error)?;
    Ok(ws.on_upgrade(move |socket| bridge(socket, tunnel)))
}

/// A port a running task declared, over a WebSocket of binary messages
/// (an empty one ends what goes to the task; `unidesk task port-forward`).
#[utoipa::path(get, path = "/api/v1/tasks/{id}/ports/{port}", tag = "sessions",
    responses((status = 101, description = "WebSocket"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 502, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn port(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, port)): Path<(String, u16)>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let (task_id, task) = task_for(&state, &caller, &id).await?;
    if !task.spec.ports.contains(&port) {
        return Err(ApiError::invalid_state(format!(
            "port {port} is not one the task declared (ports: {:?})",
            task.spec.ports
        )));
    }
    let tunnel = state
        .tunnels
        .open(task.node, task_id, ud_tunnel::Target::Port(port))
        .await
        .map_err(tunnel_error)?;
    Ok(ws.on_upgrade(move |socket| bridge(socket, tunnel)))
}

/// Carries a WebSocket's messages through a tunnel and back.
async fn bridge(socket: WebSocket, tunnel: ud_tunnel::Tunnel) {
    use futures::{SinkExt, StreamExt};
    let ud_tunnel::Tunnel {
        stream,
        controls,
        mut events,
        ended,
    } = tunnel;
    let (mut r, mut w) = tokio::io::split(stream);
    let (mut tx, mut rx) = socket.split();
    let inbound = async move {
        while let Some(Ok(m)) = rx.next().await {
            match m {
                // An empty message ends the input (the socket stays open
                // for the output).
                Message::Binary(b) if b.is_empty() => {
                    let _ = w.shutdown().await;
                }
                Message::Binary(b) if w.write_all(&b).await.is_err() => break,
                Message::Text(t) => {
                    if let Ok(c) = serde_json::from_str::<Control>(&t) {
                        let _ = controls.send(c).await;
                    }
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = w.shutdown().await;
    };
    let outbound = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send(Message::Binary(bytes::Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        while let Ok(c) = events.try_recv() {
            if let Ok(t) = serde_json::to_string(&c) {
                let _ = tx.send(Message::Text(t.into())).await;
            }
        }
        let reason = match tokio::time::timeout(Duration::from_secs(2), ended).await {
            Ok(Ok(Err(reason))) => reason,
            _ => String::new(),
        };
        if !reason.is_empty() {
            let t = serde_json::json!({ "error": reason }).to_string();
            let _ = tx.send(Message::Text(t.into())).await;
        }
        let _ = tx.send(Message::Close(None)).await;
    };
    tokio::join!(inbound, outbound);
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn tokens_are_bound_to_their_kind_session_and_time() {
        let s = SessionSettings::new(None, Some([7; 32])).unwrap_or_default();
        let t = s.sign("link", ID, 2_000);
        assert!(s.verify("link", ID, &t, 1_999));
        assert!(!s.verify("link", ID, &t, 2_001), "expired");
        assert!(!s.verify("cookie", ID, &t, 1_000), "another kind");
        assert!(
            !s.verify("link", &"f".repeat(32), &t, 1_000),
            "another session"
        );
        let forged = format!("9999999{}", &t[4..]);
        assert!(!s.verify("link", ID, &forged, 1_000), "a later expiry");
        let other = SessionSettings::new(None, Some([8; 32])).unwrap_or_default();
        assert!(!other.verify("link", ID, &t, 1_000), "another key");
        for bad in ["", ".", "x.y", "2000", "2000."] {
            assert!(!s.verify("link", ID, bad, 1_000), "{bad:?}");
        }
    }

    #[test]
    fn hosts_and_origins_name_sessions() {
        let s = SessionSettings::new(Some("https://{id}.s.example.org"), Some([7; 32]))
            .unwrap_or_default();
        assert_eq!(s.origin_of(ID), Some(format!("https://{ID}.s.example.org")));
        assert_eq!(
            s.session_of_host(&format!("{ID}.s.example.org")),
            Some(ID.into())
        );
        assert_eq!(
            s.session_of_host(&format!("{ID}.s.example.org:443")),
            Some(ID.into())
        );
        assert_eq!(s.session_of_host("app.example.org"), None);
        assert_eq!(s.session_of_host(&format!("x{ID}.s.example.org")), None);
        assert!(s.own_origin(ID, &format!("https://{ID}.s.example.org")));
        assert!(!s.own_origin(ID, &format!("http://{ID}.s.example.org")));
        assert!(!s.own_origin(ID, "https://evil.example"));
        assert!(!s.own_origin(ID, &format!("https://{}.s.example.org", "f".repeat(32))));
        let with_port = SessionSettings::new(Some("http://{id}.s.localhost:8443/"), Some([7; 32]))
            .unwrap_or_default();
        assert_eq!(
            with_port.session_of_host(&format!("{ID}.s.localhost:8443")),
            Some(ID.into())
        );
        assert_eq!(
            with_port.session_of_host(&format!("{ID}.s.localhost:80")),
            None
        );
        for bad in [
            "s.example.org",
            "ftp://{id}.x.org",
            "https://x.{id}.org",
            "https://{id}",
            "https://{id}.a/b",
        ] {
            assert!(OriginTemplate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_platform_credentials_never_reach_a_session() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer secret"),
        );
        h.append(
            header::COOKIE,
            HeaderValue::from_static("ud_session=1.abc; theirs=2"),
        );
        h.append(header::COOKIE, HeaderValue::from_static("ud_other=x"));
        h.insert(header::ACCEPT, HeaderValue::from_static("text/html"));
        let out = forwarded_headers(&h);
        assert!(out.get(header::AUTHORIZATION).is_none());
        assert_eq!(
            out.get(header::COOKIE).and_then(|v| v.to_str().ok()),
            Some("theirs=2")
        );
        assert_eq!(
            out.get(header::ACCEPT).and_then(|v| v.to_str().ok()),
            Some("text/html")
        );
        assert_eq!(cookie_of(&h, COOKIE).as_deref(), Some("1.abc"));
    }
}
