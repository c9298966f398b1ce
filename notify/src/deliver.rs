//! The delivery service: follows the task stream's final, retry and
//! waiting events through the durable consumer `webhooks`, and nodes going
//! offline through `webhooks-nodes`; POSTs each to the webhooks that ask
//! for its type (a task's: of its project; a node's: of every project),
//! and acknowledges the event once every delivery of it has ended
//! (delivered, or every try failed), logging each in `UD_WEBHOOK_LOG`.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use backon::{ExponentialBuilder, Retryable};
use futures::StreamExt;
use tracing::{info, info_span, warn, Instrument};
use ud_core::aggregate::Repository;
use ud_core::node::Node;
use ud_core::store::EventStore;
use ud_core::task::Task;
use ud_schemas::api::{WebhookDelivery, WebhookRecord};
use ud_schemas::{codec, streams, Event};

use crate::{body, nats, sign, Happened, NotifyError, TASK_EVENTS};

/// The durable consumers the main servers share.
pub const CONSUMER: &str = "webhooks";
pub const NODES_CONSUMER: &str = "webhooks-nodes";

/// Events in hand at once, each delivered to its webhooks in parallel (all
/// that the consumer gives out, so none waits out its ack wait unhandled).
const IN_HAND: usize = 64;

/// How often an event in hand is said to be in progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct Settings {
    /// Tries per delivery, the first included.
    pub tries: usize,
    /// The wait before the second try; doubled each time, at most a minute.
    pub first_delay: Duration,
    /// How long a receiver has to answer one try.
    pub timeout: Duration,
    /// Whether webhooks may reach loopback, private and link-local
    /// addresses (the platform's own network); off, such a delivery fails
    /// saying so.
    pub allow_private: bool,
    /// The SMTP server e-mail webhooks are sent through; none: they fail
    /// saying so (and the API refuses to make them).
    pub smtp: Option<Smtp>,
}

/// An SMTP server to send e-mail through.
#[derive(Clone, Debug)]
pub struct Smtp {
    /// `smtp://[user:password@]host[:port][?tls=required|opportunistic]`
    /// (port 25 without TLS by default; `?tls=required` for STARTTLS) or
    /// `smtps://...` (TLS from the start, port 465).
    pub url: String,
    /// The sender, e.g. `UniDesk <unidesk@lab.example.org>`.
    pub from: String,
}

type Mailer = lettre::AsyncSmtpTransport<lettre::Tokio1Executor>;

impl Smtp {
    /// The transport, or why the settings do not make one.
    pub fn mailer(&self) -> Result<(Mailer, lettre::message::Mailbox), String> {
        let from = self
            .from
            .parse()
            .map_err(|e| format!("UD_SMTP_FROM {:?}: {e}", self.from))?;
        let mailer = Mailer::from_url(&self.url)
            .map_err(|e| format!("UD_SMTP_URL: {e}"))?
            .timeout(Some(Duration::from_secs(10)))
            .build();
        Ok((mailer, from))
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            tries: 8,
            first_delay: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
            allow_private: false,
            smtp: None,
        }
    }
}

/// The subject a webhook's deliveries are logged under.
pub fn log_subject(project: &str, name: &str) -> String {
    format!("ud.webhook.{project}.{name}")
}

/// The key of webhook `name` of `project` in the webhooks bucket.
pub fn hook_key(project: &str, name: &str) -> String {
    format!("{project}.{name}")
}

/// The webhooks of `project` (every project's: `None`), by name (the API
/// lists them; deliveries pick those asking for an event).
pub async fn project_hooks(
    kv: &jetstream::kv::Store,
    project: Option<&str>,
) -> Result<Vec<WebhookRecord>, NotifyError> {
    let prefix = project.map(|p| format!("{p}.")).unwrap_or_default();
    let mut keys = kv.keys().await.map_err(nats)?;
    let mut names = Vec::new();
    while let Some(k) = keys.next().await {
        let k = k.map_err(nats)?;
        if k.starts_with(&prefix) {
            names.push(k);
        }
    }
    names.sort();
    let mut out = Vec::new();
    for k in names {
        if let Some(v) = kv.get(&k).await.map_err(nats)? {
            match serde_json::from_slice::<WebhookRecord>(&v) {
                Ok(h) => out.push(h),
                Err(e) => warn!(key = %k, error = %e, "unreadable webhook ignored"),
            }
        }
    }
    Ok(out)
}

/// Every project's webhooks as the bucket holds them, kept by a watch on
/// the bucket (`None` until it has been read, and while the watch is being
/// made again: then the bucket itself is read). Most events are asked for
/// by no webhook; told so here, they cost no read of the task's history
/// and no listing of the bucket.
#[derive(Clone, Default)]
struct Hooks(Arc<RwLock<Option<BTreeMap<String, WebhookRecord>>>>);

impl Hooks {
    /// The webhooks of `project` (`None`: of every project) that ask for
    /// `event_type`, or `None` when the view is not ready.
    fn asking(&self, project: Option<&str>, event_type: &str) -> Option<Vec<WebhookRecord>> {
        let view = self.0.read().unwrap_or_else(|e| e.into_inner());
        let all = view.as_ref()?;
        Some(
            all.values()
                .filter(|h| asks(h, project, event_type))
                .cloned()
                .collect(),
        )
    }

    /// Whether no webhook of any project asks for `event_type` (`false`
    /// while the view is not ready), without copying any.
    fn none_asks(&self, event_type: &str) -> bool {
        let view = self.0.read().unwrap_or_else(|e| e.into_inner());
        view.as_ref()
            .is_some_and(|all| !all.values().any(|h| asks(h, None, event_type)))
    }

    fn set(&self, view: Option<BTreeMap<String, WebhookRecord>>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = view;
    }

    fn apply(&self, entry: &jetstream::kv::Entry) {
        let mut view = self.0.write().unwrap_or_else(|e| e.into_inner());
        let Some(all) = view.as_mut() else { return };
        match entry.operation {
            jetstream::kv::Operation::Put => {
                match serde_json::from_slice::<WebhookRecord>(&entry.value) {
                    Ok(h) => {
                        all.insert(entry.key.clone(), h);
                    }
                    Err(e) => {
                        warn!(key = %entry.key, error = %e, "unreadable webhook ignored");
                        all.remove(&entry.key);
                    }
                }
            }
            jetstream::kv::Operation::Delete | jetstream::kv::Operation::Purge => {
                all.remove(&entry.key);
            }
        }
    }

    /// Keeps the view until the task is dropped: watches the bucket first,
    /// then reads it whole, then applies what the watch saw since (a change
    /// seen twice comes out the same), and starts again if the watch ends.
    async fn keep(self, kv: jetstream::kv::Store) {
        loop {
            match kv.watch_all().await {
                Ok(mut watch) => match project_hooks(&kv, None).await {
                    Ok(all) => {
                        let keyed = all
                            .into_iter()
                            .map(|h| (hook_key(&h.project, &h.name), h))
                            .collect();
                        self.set(Some(keyed));
                        while let Some(Ok(entry)) = watch.next().await {
                            self.apply(&entry);
                        }
                        warn!("the watch on the webhooks ended; reading them again");
                    }
                    Err(e) => warn!(error = %e, "cannot read the webhooks; trying again"),
                },
                Err(e) => warn!(error = %e, "cannot watch the webhooks; trying again"),
            }
            self.set(None);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Whether `hook` is of `project` (`None`: any) and asks for `event_type`.
fn asks(hook: &WebhookRecord, project: Option<&str>, event_type: &str) -> bool {
    project.is_none_or(|p| hook.project == p) && hook.events.iter().any(|e| e == event_type)
}

/// Why a try did not deliver: the receiver's status, if it answered, and
/// whether trying again can help.
struct Failed {
    status: Option<u16>,
    error: String,
    again: bool,
}

impl Failed {
    fn last(error: impl Into<String>) -> Self {
        Self {
            status: None,
            error: error.into(),
            again: false,
        }
    }
}

/// Whether `ip` is of the platform's own networks: loopback, private,
/// link-local, unspecified, or the like.
fn private(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.octets()[0] == 100 && (64..128).contains(&v4.octets()[1])
        }
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || (v6.segments()[0] & 0xfe00) == 0xfc00
                || (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6.to_ipv4_mapped().is_some_and(|v4| private(v4.into()))
        }
    }
}

/// Refuses a URL whose host resolves to one of the platform's own
/// networks, unless allowed.
async fn reachable(url: &str, settings: &Settings) -> Result<(), Failed> {
    if settings.allow_private {
        return Ok(());
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| Failed::last(format!("bad URL: {e}")))?;
    let host = parsed
        .host_str()
        .ok_or_else(|| Failed::last("the URL names no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = parsed.port_or_known_default().unwrap_or(443);
    let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| Failed {
            status: None,
            error: format!("cannot resolve {host}: {e}"),
            again: true,
        })?
        .collect();
    if addrs.iter().any(|a| private(a.ip())) {
        return Err(Failed::last(format!(
            "refused: {host} is an address of the platform's own networks (UD_WEBHOOK_PRIVATE allows it)"
        )));
    }
    Ok(())
}

/// Whether the webhook is still the one being delivered (not deleted, not
/// made anew under its name).
async fn still_there(kv: &jetstream::kv::Store, hook: &WebhookRecord) -> bool {
    match kv.get(hook_key(&hook.project, &hook.name)).await {
        Ok(Some(v)) => serde_json::from_slice::<WebhookRecord>(&v)
            .is_ok_and(|now| now.secret == hook.secret && now.created_at == hook.created_at),
        Ok(None) => false,
        // Unknown: go on.
        Err(_) => true,
    }
}

/// One try of an e-mail webhook: the mail handed to the SMTP server.
async fn send_mail(
    mailer: Option<&(Mailer, lettre::message::Mailbox)>,
    hook: &WebhookRecord,
    h: &Happened,
) -> Result<u16, Failed> {
    use lettre::AsyncTransport;
    let (mailer, from) =
        mailer.ok_or_else(|| Failed::last("no SMTP server is set (UD_SMTP_URL)"))?;
    let to = crate::recipients(&hook.url).ok_or_else(|| Failed::last("no addresses"))?;
    let (subject, text) = crate::mail(hook, h);
    let mut message = lettre::Message::builder()
        .from(from.clone())
        .subject(subject)
        .message_id(Some(format!("<{}.{}@unidesk>", h.event_id, hook.name)));
    for a in &to {
        let mailbox = a
            .parse()
            .map_err(|e| Failed::last(format!("address {a}: {e}")))?;
        message = message.to(mailbox);
    }
    let message = message
        .header(lettre::message::header::ContentType::TEXT_PLAIN)
        .body(text)
        .map_err(|e| Failed::last(format!("the mail cannot be made: {e}")))?;
    match mailer.send(message).await {
        Ok(r) => Ok(r.code().into()),
        Err(e) => Err(Failed {
            status: e.status().map(u16::from),
            error: format!("the SMTP server: {e}"),
            // A permanent refusal (5xx) stays one.
            again: !e.is_permanent(),
        }),
    }
}

/// One delivery, tried until it is taken, the tries run out, or the
/// webhook is gone.
async fn deliver_one(
    http: &reqwest::Client,
    mailer: Option<&(Mailer, lettre::message::Mailbox)>,
    kv: &jetstream::kv::Store,
    settings: &Settings,
    hook: &WebhookRecord,
    h: &Happened,
) -> WebhookDelivery {
    let payload = body(hook, h);
    let mut attempts = 0u32;
    let mut last_status = None;
    let attempt = || {
        let payload = payload.clone();
        let first = attempts == 0;
        attempts += 1;
        async move {
            if !first && !still_there(kv, hook).await {
                return Err(Failed::last("the webhook was deleted"));
            }
            if hook.format == "email" {
                return send_mail(mailer, hook, h).await;
            }
            reachable(&hook.url, settings).await?;
            let now = ud_schemas::now_millis() / 1000;
            let resp = http
                .post(&hook.url)
                .header("Content-Type", "application/json")
                .header("User-Agent", "UniDesk-Webhooks")
                .header("UniDesk-Event", &h.event_type)
                .header("UniDesk-Delivery", &h.event_id)
                .header(sign::HEADER, sign::signature(&hook.secret, now, &payload))
                .timeout(settings.timeout)
                .body(payload)
                .send()
                .await
                .map_err(|e| Failed {
                    status: None,
                    error: format!("{e}"),
                    again: true,
                })?;
            let status = resp.status();
            if status.is_success() {
                Ok(status.as_u16())
            } else {
                Err(Failed {
                    status: Some(status.as_u16()),
                    error: format!("the receiver answered {status}"),
                    again: true,
                })
            }
        }
    };
    let backoff = ExponentialBuilder::default()
        .with_min_delay(settings.first_delay)
        .with_max_delay(Duration::from_secs(60))
        .with_max_times(settings.tries.saturating_sub(1));
    let result = attempt
        .retry(backoff)
        .when(|e: &Failed| e.again)
        .notify(|e: &Failed, _| {
            last_status = e.status.or(last_status);
        })
        .await;
    let (outcome, status, error) = match result {
        Ok(s) => ("delivered", Some(s), None),
        Err(f) => ("failed", f.status.or(last_status), Some(f.error)),
    };
    WebhookDelivery {
        event_id: h.event_id.clone(),
        event_type: h.event_type.clone(),
        task_id: h.task_id.clone(),
        outcome: outcome.into(),
        attempts,
        status,
        error,
        at: ud_schemas::now_millis(),
    }
}

/// What the service reads besides the event: aggregates and buckets.
struct Sources {
    js: jetstream::Context,
    hooks: jetstream::kv::Store,
    view: Hooks,
    notified: jetstream::kv::Store,
    tasks: Repository<Task>,
    nodes: Repository<Node>,
}

impl Sources {
    /// The webhooks of `project` (`None`: of every project) asking for
    /// `event_type`: from the view, or from the bucket while it is not ready.
    async fn asking(
        &self,
        project: Option<&str>,
        event_type: &str,
    ) -> Result<Vec<WebhookRecord>, NotifyError> {
        if let Some(hooks) = self.view.asking(project, event_type) {
            return Ok(hooks);
        }
        let mut hooks = project_hooks(&self.hooks, project).await?;
        hooks.retain(|h| asks(h, project, event_type));
        Ok(hooks)
    }
}

/// The event type an event is told as, if it is told at all.
fn told_as(event: &Event) -> Option<String> {
    match event {
        // A task waiting on its project's quota: the project is told, once
        // an hour at most for each limit.
        Event::Task(_, ud_schemas::TaskEvent::Waiting(w)) => match &w.kind {
            Some(k) if k.starts_with("quota ") => Some("quota.reached".to_owned()),
            _ => None,
        },
        Event::Task(..) => Some(event.event_type()),
        Event::Node(_, ud_schemas::NodeEvent::WentOffline(_)) => Some("node.offline".to_owned()),
        _ => None,
    }
}

/// What an event told as `event_type` says, and to which project's
/// webhooks (`None`: every project's); `None` when it is not told.
async fn happened(
    src: &Sources,
    seq: u64,
    env: codec::EventEnvelope,
    event_type: String,
) -> Result<Option<(Happened, Option<String>)>, NotifyError> {
    let event_id = env.meta.event_id.to_string();
    let data = codec::event_data_json(&env.event);
    match env.event {
        Event::Task(id, _) => {
            let Some((task, _)) = src.tasks.load(&id).await? else {
                return Ok(None);
            };
            let project = task.project.to_string();
            Ok(Some((
                Happened {
                    event_id,
                    event_type,
                    seq,
                    task_id: Some(id.to_string()),
                    task_name: task.spec.name.clone(),
                    node_id: None,
                    node_name: None,
                    project: Some(project.clone()),
                    data,
                },
                Some(project),
            )))
        }
        Event::Node(id, ud_schemas::NodeEvent::WentOffline(_)) => {
            let name = src.nodes.load(&id).await?.map(|(n, _)| n.name);
            Ok(Some((
                Happened {
                    event_id,
                    event_type,
                    seq,
                    task_id: None,
                    task_name: None,
                    node_id: Some(id.to_string()),
                    node_name: name,
                    project: None,
                    data,
                },
                None,
            )))
        }
        _ => Ok(None),
    }
}

/// Delivers one stored event to every webhook that asks for it.
async fn handle(
    src: &Sources,
    http: &reqwest::Client,
    mailer: Option<&(Mailer, lettre::message::Mailbox)>,
    settings: &Settings,
    m: &jetstream::Message,
) -> Result<(), NotifyError> {
    let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
    let env = match codec::decode_message(m.subject.as_str(), m.headers.as_ref(), &m.payload) {
        Ok(env) => env,
        Err(e) => {
            warn!(seq, error = %e, "undecodable event; no webhook for it");
            return Ok(());
        }
    };
    let Some(event_type) = told_as(&env.event) else {
        return Ok(());
    };
    // No webhook of any project asks for it: nothing to read.
    if src.view.none_asks(&event_type) {
        return Ok(());
    }
    let Some((happened, project)) = happened(src, seq, env, event_type).await? else {
        return Ok(());
    };
    let hooks = src.asking(project.as_deref(), &happened.event_type).await?;
    if hooks.is_empty() {
        return Ok(());
    }
    if happened.event_type == "quota.reached" {
        // A project at its quota is told once an hour at most per limit:
        // the first to write the key tells; the key lives an hour.
        let limit = happened.data["kind"].as_str().unwrap_or_default();
        let key = format!(
            "quota.{}.{}",
            project.as_deref().unwrap_or_default(),
            limit.trim_start_matches("quota ")
        );
        if let Err(e) = src.notified.create(&key, "".into()).await {
            return match e.kind() {
                jetstream::kv::CreateErrorKind::AlreadyExists => Ok(()),
                _ => Err(nats(e)),
            };
        }
    }
    let deliveries = hooks.iter().map(|hook| {
        let happened = &happened;
        async move {
            (
                hook,
                deliver_one(http, mailer, &src.hooks, settings, hook, happened).await,
            )
        }
    });
    for (hook, d) in futures::future::join_all(deliveries).await {
        if d.outcome == "delivered" {
            info!(webhook = %hook.name, attempts = d.attempts, "webhook delivered");
        } else {
            warn!(webhook = %hook.name, attempts = d.attempts, error = ?d.error, "webhook not delivered");
        }
        let entry = serde_json::to_vec(&d).unwrap_or_default();
        src.js
            .publish(log_subject(&hook.project, &hook.name), entry.into())
            .await
            .map_err(nats)?
            .await
            .map_err(nats)?;
    }
    Ok(())
}

/// The durable consumer `name` of `stream` on `subjects`, made or brought
/// to this configuration.
async fn consumer(
    js: &jetstream::Context,
    stream: &str,
    name: &str,
    subjects: Vec<String>,
) -> Result<consumer::PullConsumer, NotifyError> {
    js.get_stream(stream)
        .await
        .map_err(nats)?
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name.into()),
            // From when webhooks first ran: no history is delivered.
            deliver_policy: consumer::DeliverPolicy::New,
            filter_subjects: subjects,
            ack_policy: consumer::AckPolicy::Explicit,
            // Every try of every webhook of an event, with room.
            ack_wait: Duration::from_secs(15 * 60),
            max_ack_pending: IN_HAND as i64,
            ..Default::default()
        })
        .await
        .map_err(nats)
}

/// Runs until the stream ends; the caller's supervisor starts it again
/// after an error (the events not acknowledged come again).
pub async fn run(store: EventStore, settings: Settings) -> Result<(), NotifyError> {
    let js = store.jetstream().clone();
    let hooks = js
        .get_key_value(streams::WEBHOOKS_BUCKET)
        .await
        .map_err(nats)?;
    let view = Hooks::default();
    let _view_kept =
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(view.clone().keep(hooks.clone())));
    let src = Sources {
        hooks,
        view,
        notified: js
            .get_key_value(streams::NOTIFIED_BUCKET)
            .await
            .map_err(nats)?,
        tasks: Repository::<Task>::new(store.clone()),
        nodes: Repository::<Node>::new(store.clone()),
        js: js.clone(),
    };
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(nats)?;
    let mailer = match &settings.smtp {
        Some(smtp) => Some(smtp.mailer().map_err(NotifyError::Settings)?),
        None => None,
    };
    let mut task_subjects: Vec<String> = TASK_EVENTS
        .iter()
        .map(|t| format!("ud.task.*.{t}"))
        .collect();
    task_subjects.push("ud.task.*.waiting".into());
    let tasks = consumer(&js, streams::TASKS, CONSUMER, task_subjects).await?;
    let nodes = consumer(
        &js,
        streams::NODES,
        NODES_CONSUMER,
        vec!["ud.node.*.offline".into()],
    )
    .await?;
    let messages = futures::stream::select(
        tasks.messages().await.map_err(nats)?,
        nodes.messages().await.map_err(nats)?,
    );
    messages
        .map(|m| m.map_err(nats))
        // Each consumer's events in hand, from both.
        .for_each_concurrent(2 * IN_HAND, |m| {
            let (src, http, mailer, settings) = (&src, &http, mailer.as_ref(), &settings);
            async move {
                let m = match m {
                    Ok(m) => m,
                    Err(e) => {
                        warn!(error = %e, "webhook events interrupted");
                        return;
                    }
                };
                let span = info_span!("webhook", subject = %m.subject);
                let work = handle(src, http, mailer, settings, &m).instrument(span);
                tokio::pin!(work);
                // Tries of a slow receiver can outlast the ack wait: the
                // event is said to be in hand meanwhile, not sent again.
                let mut progress = tokio::time::interval(PROGRESS_EVERY);
                progress.tick().await;
                let done = loop {
                    tokio::select! {
                        done = &mut work => break done,
                        _ = progress.tick() => {
                            let _ = m.ack_with(jetstream::AckKind::Progress).await;
                        }
                    }
                };
                match done {
                    Ok(()) => {
                        if let Err(e) = m.ack().await {
                            warn!(error = %e, "webhook event not acknowledged; it comes again");
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "webhook event not handled; it comes again");
                        let _ = m
                            .ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(5))))
                            .await;
                    }
                }
            }
        })
        .await;
    Err(NotifyError::Nats("the webhook events ended".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_view_of_the_webhooks_says_who_asks_for_an_event() {
        let hook = |project: &str, name: &str, events: &[&str]| WebhookRecord {
            project: project.into(),
            name: name.into(),
            url: "https://example.org/hook".into(),
            events: events.iter().map(|e| (*e).to_owned()).collect(),
            format: "json".into(),
            secret: String::new(),
            created_by: "admin".into(),
            created_at: 0,
        };
        let view = Hooks::default();
        assert!(view.asking(None, "task.failed").is_none(), "not read yet");
        let all = [
            hook("a", "one", &["task.failed"]),
            hook("b", "two", &["task.failed", "node.offline"]),
        ];
        view.set(Some(
            all.iter()
                .map(|h| (hook_key(&h.project, &h.name), h.clone()))
                .collect(),
        ));
        let names = |hooks: Option<Vec<WebhookRecord>>| -> Vec<String> {
            hooks
                .unwrap_or_default()
                .into_iter()
                .map(|h| h.name)
                .collect()
        };
        assert_eq!(names(view.asking(None, "task.failed")), ["one", "two"]);
        assert_eq!(names(view.asking(Some("a"), "task.failed")), ["one"]);
        assert_eq!(names(view.asking(None, "node.offline")), ["two"]);
        assert_eq!(view.asking(None, "task.succeeded"), Some(vec![]));
        assert!(view.none_asks("task.succeeded"));
        assert!(!view.none_asks("node.offline"));
        view.set(None);
        assert!(
            !view.none_asks("task.succeeded"),
            "not ready: the bucket is read"
        );
    }

    #[test]
    fn events_are_told_as_their_type_quota_waits_only_as_quota_reached() {
        let task = ud_schemas::TaskId::new();
        let waiting = |kind: Option<&str>| {
            Event::Task(
                task,
                ud_schemas::TaskEvent::Waiting(ud_schemas::events::TaskWaiting {
                    at: 0,
                    reason: "waits".into(),
                    kind: kind.map(str::to_owned),
                }),
            )
        };
        assert_eq!(
            told_as(&waiting(Some("quota gpus"))).as_deref(),
            Some("quota.reached")
        );
        assert_eq!(told_as(&waiting(Some("resources"))), None);
        assert_eq!(told_as(&waiting(None)), None);
    }

    #[test]
    fn the_platforms_own_networks_are_told_apart() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.9",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(
                private(ip.parse().unwrap_or_else(|_| unreachable!())),
                "{ip}"
            );
        }
        for ip in ["93.184.216.34", "2606:2800:220:1::1", "100.128.0.1"] {
            assert!(
                !private(ip.parse().unwrap_or_else(|_| unreachable!())),
                "{ip}"
            );
        }
    }

    #[tokio::test]
    async fn a_private_address_is_refused_unless_allowed() {
        let settings = Settings::default();
        let refused = reachable("http://127.0.0.1:9/x", &settings).await;
        let f = refused.err().unwrap_or_else(|| Failed::last("reached"));
        assert!(
            f.error.contains("refused: 127.0.0.1") && !f.again,
            "{}",
            f.error
        );
        let refused = reachable("http://[::1]:9/x", &settings).await;
        assert!(refused.is_err());
        let allowed = Settings {
            allow_private: true,
            ..Settings::default()
        };
        assert!(reachable("http://127.0.0.1:9/x", &allowed).await.is_ok());
    }
}
