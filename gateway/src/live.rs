//! `GET /api/v1/live`: one WebSocket that streams the events a token may see,
//! resumable from a stream sequence. The protocol is in `docs/contract.md`
//! ("Live updates"): the client's first message names its token and what it
//! follows; the server answers `ready` once the read models include every
//! event up to the sequences it names, then sends events as they are stored.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::DeliverPolicy;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{debug, warn};
use ud_schemas::{codec, streams, Event, PipelineEvent, PipelineId, TaskEvent, TaskId};
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::AppState;

/// How long a new connection may take to send its first message.
const HELLO_WITHIN: Duration = Duration::from_secs(10);
/// Server pings keep idle connections open through proxies.
const PING_EVERY: Duration = Duration::from_secs(20);
/// Longest wait for the read models before `ready` is sent anyway.
const READY_WAIT: Duration = Duration::from_secs(5);
/// Close code for a refused token (4000-4999 are the application's).
pub const CLOSE_UNAUTHORIZED: u16 = 4401;
/// Close code for a first message that cannot be read.
pub const CLOSE_BAD_REQUEST: u16 = 4400;
/// Close code when the event stream cannot be followed; reconnect and resume.
pub const CLOSE_UNAVAILABLE: u16 = 4503;

/// Where to start following a stream.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Follow {
    /// Send events stored after this stream sequence (the `seq` of the last
    /// event received, to resume); absent: only events stored from now on.
    pub after: Option<u64>,
}

/// The client's first message.
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// An API token; may be left out when the upgrade request carried
    /// `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Follow task events (of projects the token may see).
    pub tasks: Option<Follow>,
    /// Only this task's events (and, with `log`, its output).
    pub task_id: Option<String>,
    /// Follow node events (enrolled, registered, offline, scheduling, revoked).
    pub nodes: Option<Follow>,
    /// With `task_id`: follow the task's output; `after` is a log sequence.
    pub log: Option<Follow>,
    /// Follow pipeline events (of projects the token may see).
    pub pipelines: Option<Follow>,
}

/// What the server sends: one JSON object per text message, told apart by `type`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Outgoing {
    /// Sent once after the first message: the streams' last sequences when the
    /// connection was set up. The read models already include every event up
    /// to them, so reading the REST API now and applying the events that
    /// follow misses nothing.
    Ready {
        tasks_seq: u64,
        nodes_seq: u64,
        log_seq: u64,
        pipelines_seq: u64,
    },
    /// A stored event.
    Event {
        /// `tasks`, `nodes` or `pipelines`.
        stream: String,
        seq: u64,
        subject: String,
        /// e.g. `task.started`, `node.went_offline`.
        event_type: String,
        task_id: Option<String>,
        node_id: Option<String>,
        /// For pipeline events.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pipeline_id: Option<String>,
        project: Option<String>,
        stored_at: String,
        actor: String,
        data: serde_json::Value,
    },
    /// A chunk of the followed task's output.
    Log {
        task_id: String,
        seq: u64,
        attempt: u32,
        /// stdout or stderr.
        stream: String,
        at: i64,
        text: String,
    },
    /// Why the server closes the connection (sent just before the close).
    Error { error: String, message: String },
}

/// Upgrade to the live WebSocket.
#[utoipa::path(get, path = "/api/v1/live", tag = "live",
    description = "WebSocket. First client message: `Hello` (token, what to follow, where to resume). \
Server messages: `Outgoing` objects told apart by `type` (ready, event, log, error). \
Close codes: 4400 bad first message, 4401 token refused, 4503 stream unavailable (reconnect and resume with the last `seq`).",
    responses((status = 101, description = "switching to the WebSocket protocol", body = Outgoing)))]
pub async fn live(
    State(state): State<AppState>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(|s| s.trim().to_owned());
    ws.on_upgrade(move |socket| session(state, socket, bearer))
}

async fn close(socket: &mut WebSocket, code: u16, error: &str, message: String) {
    let body = Outgoing::Error {
        error: error.into(),
        message: message.clone(),
    };
    if let Ok(text) = serde_json::to_string(&body) {
        let _ = socket.send(Message::Text(text.into())).await;
    }
    let reason: String = message.chars().take(100).collect();
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from(reason),
        })))
        .await;
}

async fn read_hello(socket: &mut WebSocket) -> Result<Hello, String> {
    let first = tokio::time::timeout(HELLO_WITHIN, socket.recv())
        .await
        .map_err(|_| "no first message within 10 s".to_owned())?;
    match first {
        Some(Ok(Message::Text(t))) => {
            serde_json::from_str(t.as_str()).map_err(|e| format!("first message: {e}"))
        }
        Some(Ok(_)) => Err("the first message must be a JSON text message".into()),
        Some(Err(e)) => Err(e.to_string()),
        None => Err("closed".into()),
    }
}

async fn last_seq(js: &jetstream::Context, stream: &str) -> Result<u64, String> {
    let mut s = js.get_stream(stream).await.map_err(|e| e.to_string())?;
    Ok(s.info()
        .await
        .map_err(|e| e.to_string())?
        .state
        .last_sequence)
}

async fn session(state: AppState, mut socket: WebSocket, bearer: Option<String>) {
    let hello = match read_hello(&mut socket).await {
        Ok(h) => h,
        Err(e) => return close(&mut socket, CLOSE_BAD_REQUEST, "invalid_request", e).await,
    };
    let Some(secret) = hello.token.clone().or(bearer) else {
        let msg = "the first message must carry `token`".to_owned();
        return close(&mut socket, CLOSE_UNAUTHORIZED, "unauthorized", msg).await;
    };
    let caller = match Caller::from_secret(&state, &secret).await {
        Ok(c) => c,
        Err(e) if e.status.is_server_error() => {
            return close(
                &mut socket,
                CLOSE_UNAVAILABLE,
                "unavailable",
                e.body.message,
            )
            .await
        }
        Err(e) => {
            return close(
                &mut socket,
                CLOSE_UNAUTHORIZED,
                "unauthorized",
                e.body.message,
            )
            .await
        }
    };
    let task = match hello.task_id.as_deref().map(str::parse::<TaskId>) {
        None => None,
        Some(Ok(id))
            if visible_project(&state, &id)
                .await
                .is_some_and(|p| caller.may_see(&p)) =>
        {
            Some(id)
        }
        Some(_) => {
            let msg = "task_id: no such task".to_owned();
            return close(&mut socket, CLOSE_BAD_REQUEST, "not_found", msg).await;
        }
    };
    if hello.log.is_some() && task.is_none() {
        let msg = "log: needs task_id".to_owned();
        return close(&mut socket, CLOSE_BAD_REQUEST, "invalid_request", msg).await;
    }
    let js = state.commands.store().jetstream().clone();
    let seqs = async {
        Ok::<_, String>((
            last_seq(&js, streams::TASKS).await?,
            last_seq(&js, streams::NODES).await?,
            last_seq(&js, streams::LOGS).await?,
            last_seq(&js, streams::PIPELINES).await?,
        ))
    };
    let (tasks_seq, nodes_seq, log_seq, pipelines_seq) = match seqs.await {
        Ok(s) => s,
        Err(e) => return close(&mut socket, CLOSE_UNAVAILABLE, "unavailable", e).await,
    };
    state
        .projected
        .wait(streams::TASKS, tasks_seq, READY_WAIT)
        .await;
    state
        .projected
        .wait(streams::NODES, nodes_seq, READY_WAIT)
        .await;
    state
        .projected
        .wait(streams::PIPELINES, pipelines_seq, READY_WAIT)
        .await;

    let (tx, mut rx) = mpsc::channel::<Result<Outgoing, String>>(256);
    let mut followers = tokio::task::JoinSet::new();
    let start = |f: Follow, last: u64| f.after.unwrap_or(last).saturating_add(1);
    if let Some(f) = hello.tasks {
        let filter = task.map(|t| ud_schemas::subjects::task_all(&t));
        let from = start(f, tasks_seq);
        let (state, caller, tx) = (state.clone(), caller.clone(), tx.clone());
        followers.spawn(async move {
            let r = follow_tasks(&state, &caller, filter, from, &tx).await;
            if let Err(e) = r {
                let _ = tx.send(Err(e)).await;
            }
        });
    }
    if let Some(f) = hello.nodes {
        let from = start(f, nodes_seq);
        let (js, tx) = (js.clone(), tx.clone());
        followers.spawn(async move {
            let r = follow_nodes(&js, from, &tx).await;
            if let Err(e) = r {
                let _ = tx.send(Err(e)).await;
            }
        });
    }
    if let Some(f) = hello.pipelines {
        let from = start(f, pipelines_seq);
        let (state, caller, tx) = (state.clone(), caller.clone(), tx.clone());
        followers.spawn(async move {
            let r = follow_pipelines(&state, &caller, from, &tx).await;
            if let Err(e) = r {
                let _ = tx.send(Err(e)).await;
            }
        });
    }
    if let (Some(f), Some(t)) = (hello.log, task) {
        let from = f.after.map_or(1, |a| a.saturating_add(1));
        let (js, tx) = (js.clone(), tx.clone());
        followers.spawn(async move {
            let r = follow_log(&js, t, from, &tx).await;
            if let Err(e) = r {
                let _ = tx.send(Err(e)).await;
            }
        });
    }
    drop(tx);

    let ready = Outgoing::Ready {
        tasks_seq,
        nodes_seq,
        log_seq,
        pipelines_seq,
    };
    if send(&mut socket, &ready).await.is_err() {
        return;
    }
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    // The token and the roles it carries are looked at again as often as
    // the gateway's cache forgets them: a revoked token, or roles that
    // changed, end the connection (a client connects again from its cursor).
    let mut recheck = tokio::time::interval(crate::auth::TOKEN_CACHE_TTL);
    recheck.tick().await;
    let mut following = true;
    loop {
        tokio::select! {
            out = rx.recv(), if following => match out {
                Some(Ok(msg)) => {
                    if send(&mut socket, &msg).await.is_err() {
                        break;
                    }
                }
                Some(Err(e)) => {
                    warn!(token = %caller.name, error = %e, "live connection loses its stream");
                    close(&mut socket, CLOSE_UNAVAILABLE, "unavailable", e).await;
                    break;
                }
                // Nothing followed: the connection only keeps `ready`.
                None => following = false,
            },
            inbound = socket.recv() => match inbound {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            _ = ping.tick() => {
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    break;
                }
            }
            _ = recheck.tick() => match Caller::from_secret(&state, &secret).await {
                Ok(now) if now.grants_as(&caller) => {}
                Ok(_) => {
                    let msg = "your roles changed: connect again".to_owned();
                    close(&mut socket, CLOSE_UNAVAILABLE, "roles_changed", msg).await;
                    break;
                }
                Err(e) if e.status.is_server_error() => {}
                Err(e) => {
                    close(&mut socket, CLOSE_UNAUTHORIZED, "unauthorized", e.body.message).await;
                    break;
                }
            },
        }
    }
    followers.abort_all();
    debug!(token = %caller.name, "live connection closed");
}

async fn send(socket: &mut WebSocket, msg: &Outgoing) -> Result<(), ()> {
    let text = serde_json::to_string(msg).map_err(|_| ())?;
    socket
        .send(Message::Text(text.into()))
        .await
        .map_err(|_| ())
}

async fn ordered(
    js: &jetstream::Context,
    stream: &str,
    filter: Option<String>,
    from: u64,
) -> Result<jetstream::consumer::pull::Ordered, String> {
    let s = js
        .get_stream_no_info(stream)
        .await
        .map_err(|e| e.to_string())?;
    let consumer = s
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: from.max(1),
            },
            filter_subject: filter.unwrap_or_default(),
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    consumer.messages().await.map_err(|e| e.to_string())
}

/// The project of a task: from the read model, else from its first event.
async fn visible_project(state: &AppState, id: &TaskId) -> Option<String> {
    if let Ok(client) = state.db.client().await {
        if let Ok(Some(row)) = ud_projections::db::get_task(&client, *id).await {
            return Some(row.project);
        }
    }
    let events = state
        .commands
        .store()
        .read_subject(streams::TASKS, &ud_schemas::subjects::task_all(id))
        .await
        .ok()?;
    match events.first().map(|e| &e.envelope.event) {
        Some(Event::Task(_, TaskEvent::Submitted(s))) => Some(s.project.as_str().to_owned()),
        _ => None,
    }
}

/// A stream timestamp (nanoseconds since the epoch) as RFC 3339.
fn rfc3339(nanos: i128) -> String {
    let nanos = i64::try_from(nanos).unwrap_or(i64::MAX);
    chrono::DateTime::from_timestamp_nanos(nanos)
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// Most task projects a connection remembers before it starts over.
const PROJECT_CACHE: usize = 100_000;

/// A stored event as an ordered consumer hands it over.
struct Stored {
    seq: u64,
    subject: String,
    stored_at: String,
    envelope: codec::EventEnvelope,
}

impl Stored {
    /// The event of message `m`; `None` (said in the log) when it cannot be read.
    fn of(m: &jetstream::Message) -> Option<Self> {
        let info = m.info().ok()?;
        let (seq, stored_at) = (info.stream_sequence, info.published);
        match codec::decode_message(m.subject.as_str(), m.headers.as_ref(), &m.payload) {
            Ok(envelope) => Some(Self {
                seq,
                subject: m.subject.to_string(),
                stored_at: rfc3339(stored_at.unix_timestamp_nanos()),
                envelope,
            }),
            Err(e) => {
                warn!(seq, subject = %m.subject, error = %e, "undecodable event not sent live");
                None
            }
        }
    }

    /// What the socket sends of it, from `stream`, with `data` as its payload.
    fn outgoing(self, stream: &str, project: Option<String>, data: serde_json::Value) -> Outgoing {
        let (mut task_id, mut node_id, mut pipeline_id) = (None, None, None);
        match &self.envelope.event {
            Event::Task(id, _) => task_id = Some(id.to_string()),
            Event::Node(id, _) => node_id = Some(id.to_string()),
            Event::Pipeline(id, _) => pipeline_id = Some(id.to_string()),
            Event::Auth(..) | Event::Secret(..) | Event::Schedule(..) | Event::Project(..) => {}
        }
        Outgoing::Event {
            stream: stream.into(),
            seq: self.seq,
            subject: self.subject,
            event_type: self.envelope.event.event_type(),
            task_id,
            node_id,
            pipeline_id,
            project,
            stored_at: self.stored_at,
            actor: self.envelope.meta.actor,
            data,
        }
    }
}

/// The project of an aggregate, as learnt from its first event or looked up
/// once (`look_up`), remembered for the next events.
async fn project_of<
    K: std::hash::Hash + Eq + Copy,
    F: std::future::Future<Output = Option<String>>,
>(
    projects: &mut HashMap<K, Option<String>>,
    id: K,
    first: Option<&ud_schemas::ProjectId>,
    look_up: impl FnOnce() -> F,
) -> Option<String> {
    if projects.len() >= PROJECT_CACHE {
        projects.clear();
    }
    let project = match (first, projects.get(&id)) {
        (Some(p), _) => Some(p.as_str().to_owned()),
        (None, Some(p)) => p.clone(),
        (None, None) => look_up().await,
    };
    projects.insert(id, project.clone());
    project
}

async fn follow_tasks(
    state: &AppState,
    caller: &Caller,
    filter: Option<String>,
    from: u64,
    tx: &mpsc::Sender<Result<Outgoing, String>>,
) -> Result<(), String> {
    let js = state.commands.store().jetstream();
    let mut messages = ordered(js, streams::TASKS, filter, from).await?;
    let mut projects: HashMap<TaskId, Option<String>> = HashMap::new();
    while let Some(m) = messages.next().await {
        let Some(stored) = Stored::of(&m.map_err(|e| e.to_string())?) else {
            continue;
        };
        let Event::Task(id, te) = &stored.envelope.event else {
            continue;
        };
        let first = match te {
            TaskEvent::Submitted(s) => Some(&s.project),
            _ => None,
        };
        let id = *id;
        let project = project_of(&mut projects, id, first, || visible_project(state, &id)).await;
        if !project.as_deref().is_some_and(|p| caller.may_see(p)) {
            continue;
        }
        let data = codec::event_data_json(&stored.envelope.event);
        if tx
            .send(Ok(stored.outgoing("tasks", project, data)))
            .await
            .is_err()
        {
            return Ok(());
        }
    }
    Err("task stream ended".into())
}

async fn follow_nodes(
    js: &jetstream::Context,
    from: u64,
    tx: &mpsc::Sender<Result<Outgoing, String>>,
) -> Result<(), String> {
    let mut messages = ordered(js, streams::NODES, None, from).await?;
    while let Some(m) = messages.next().await {
        let Some(stored) = Stored::of(&m.map_err(|e| e.to_string())?) else {
            continue;
        };
        if !matches!(stored.envelope.event, Event::Node(..)) {
            continue;
        }
        let mut data = codec::event_data_json(&stored.envelope.event);
        // The enrolment secret's hash stays on the server.
        if let Some(obj) = data.as_object_mut() {
            obj.remove("secret_hash");
        }
        if tx
            .send(Ok(stored.outgoing("nodes", None, data)))
            .await
            .is_err()
        {
            return Ok(());
        }
    }
    Err("node stream ended".into())
}

async fn follow_pipelines(
    state: &AppState,
    caller: &Caller,
    from: u64,
    tx: &mpsc::Sender<Result<Outgoing, String>>,
) -> Result<(), String> {
    let js = state.commands.store().jetstream();
    let mut messages = ordered(js, streams::PIPELINES, None, from).await?;
    let mut projects: HashMap<PipelineId, Option<String>> = HashMap::new();
    while let Some(m) = messages.next().await {
        let Some(stored) = Stored::of(&m.map_err(|e| e.to_string())?) else {
            continue;
        };
        let Event::Pipeline(id, pe) = &stored.envelope.event else {
            continue;
        };
        let first = match pe {
            PipelineEvent::Submitted(s) => Some(&s.project),
            _ => None,
        };
        let id = *id;
        let look_up = || async move {
            let found = state.pipelines.pipelines().current(&id).await.ok()??;
            Some(found.0.project.as_str().to_owned())
        };
        let project = project_of(&mut projects, id, first, look_up).await;
        if !project.as_deref().is_some_and(|p| caller.may_see(p)) {
            continue;
        }
        let data = codec::event_data_json(&stored.envelope.event);
        if tx
            .send(Ok(stored.outgoing("pipelines", project, data)))
            .await
            .is_err()
        {
            return Ok(());
        }
    }
    Err("pipeline stream ended".into())
}

async fn follow_log(
    js: &jetstream::Context,
    task: TaskId,
    from: u64,
    tx: &mpsc::Sender<Result<Outgoing, String>>,
) -> Result<(), String> {
    let mut messages = ordered(
        js,
        streams::LOGS,
        Some(ud_schemas::subjects::log(&task)),
        from,
    )
    .await?;
    while let Some(m) = messages.next().await {
        let m = m.map_err(|e| e.to_string())?;
        let Some(seq) = m.info().ok().map(|i| i.stream_sequence) else {
            continue;
        };
        let Ok(chunk) = ud_schemas::dispatch::from_cbor::<ud_schemas::dispatch::LogChunk>(
            &m.payload,
            "log-chunk",
        ) else {
            continue;
        };
        let out = Outgoing::Log {
            task_id: task.to_string(),
            seq,
            attempt: chunk.attempt,
            stream: chunk.stream,
            at: chunk.at,
            text: chunk.text,
        };
        if tx.send(Ok(out)).await.is_err() {
            return Ok(());
        }
    }
    Err("log stream ended".into())
}
