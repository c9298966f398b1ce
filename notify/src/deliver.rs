//! The delivery service: follows the task stream's final and retry events
//! through the durable consumer `webhooks`, POSTs each to the webhooks of
//! its task's project that ask for its type, and acknowledges the event
//! once every delivery of it has ended (delivered, or every try failed),
//! logging each in `UD_WEBHOOK_LOG`.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use backon::{ExponentialBuilder, Retryable};
use futures::StreamExt;
use tracing::{info, info_span, warn, Instrument};
use ud_core::aggregate::Repository;
use ud_core::store::EventStore;
use ud_core::task::Task;
use ud_schemas::api::{WebhookDelivery, WebhookRecord};
use ud_schemas::{codec, streams, Event};

use crate::{body, nats, sign, Happened, NotifyError, EVENTS};

/// The durable consumer the main servers share.
pub const CONSUMER: &str = "webhooks";

#[derive(Clone, Debug)]
pub struct Settings {
    /// Tries per delivery, the first included.
    pub tries: usize,
    /// The wait before the second try; doubled each time, at most a minute.
    pub first_delay: Duration,
    /// How long a receiver has to answer one try.
    pub timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            tries: 8,
            first_delay: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
        }
    }
}

/// The subject a webhook's deliveries are logged under.
pub fn log_subject(project: &str, name: &str) -> String {
    format!("ud.webhook.{project}.{name}")
}

/// The webhooks of `project` that ask for `event_type`.
async fn hooks_for(
    kv: &jetstream::kv::Store,
    project: &str,
    event_type: &str,
) -> Result<Vec<WebhookRecord>, NotifyError> {
    let prefix = format!("{project}.");
    let mut keys = kv.keys().await.map_err(nats)?;
    let mut out = Vec::new();
    while let Some(k) = keys.next().await {
        let k = k.map_err(nats)?;
        if !k.starts_with(&prefix) {
            continue;
        }
        if let Some(v) = kv.get(&k).await.map_err(nats)? {
            match serde_json::from_slice::<WebhookRecord>(&v) {
                Ok(h) if h.events.iter().any(|e| e == event_type) => out.push(h),
                Ok(_) => {}
                Err(e) => warn!(key = %k, error = %e, "unreadable webhook ignored"),
            }
        }
    }
    Ok(out)
}

/// One delivery, tried until it is taken or the tries run out.
async fn deliver_one(
    http: &reqwest::Client,
    settings: &Settings,
    hook: &WebhookRecord,
    h: &Happened,
) -> WebhookDelivery {
    let payload = body(hook, h);
    let mut attempts = 0u32;
    let mut last_status = None;
    let attempt = || {
        attempts += 1;
        let payload = payload.clone();
        async move {
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
                .map_err(|e| (None, format!("{e}")))?;
            let status = resp.status();
            if status.is_success() {
                Ok(status.as_u16())
            } else {
                Err((
                    Some(status.as_u16()),
                    format!("the receiver answered {status}"),
                ))
            }
        }
    };
    let backoff = ExponentialBuilder::default()
        .with_min_delay(settings.first_delay)
        .with_max_delay(Duration::from_secs(60))
        .with_max_times(settings.tries.saturating_sub(1));
    let result = attempt
        .retry(backoff)
        .notify(|e: &(Option<u16>, String), _| {
            last_status = e.0;
        })
        .await;
    let (outcome, status, error) = match result {
        Ok(s) => ("delivered", Some(s), None),
        Err((s, e)) => ("failed", s.or(last_status), Some(e)),
    };
    WebhookDelivery {
        event_id: h.event_id.clone(),
        event_type: h.event_type.clone(),
        task_id: Some(h.task_id.clone()),
        outcome: outcome.into(),
        attempts,
        status,
        error,
        at: ud_schemas::now_millis(),
    }
}

/// Delivers one stored event to every webhook that asks for it.
async fn handle(
    js: &jetstream::Context,
    kv: &jetstream::kv::Store,
    tasks: &Repository<Task>,
    http: &reqwest::Client,
    settings: &Settings,
    m: &jetstream::Message,
) -> Result<(), NotifyError> {
    let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
    let env = match codec::decode_message(m.subject.as_str(), m.headers.as_ref(), &m.payload) {
        Ok(env) => env,
        Err(e) => {
            warn!(seq, error = %e, "undecodable task event; no webhook for it");
            return Ok(());
        }
    };
    let Event::Task(id, ref e) = env.event else {
        return Ok(());
    };
    let event_type = env.event.event_type();
    let Some((task, _)) = tasks.load(&id).await? else {
        return Ok(());
    };
    let project = task.project.to_string();
    let hooks = hooks_for(kv, &project, &event_type).await?;
    if hooks.is_empty() {
        return Ok(());
    }
    let happened = Happened {
        event_id: env.meta.event_id.to_string(),
        event_type,
        seq,
        task_id: id.to_string(),
        task_name: task.spec.name.clone(),
        project: project.clone(),
        data: codec::event_data_json(&Event::Task(id, e.clone())),
    };
    let deliveries = hooks.iter().map(|hook| {
        let happened = &happened;
        async move { (hook, deliver_one(http, settings, hook, happened).await) }
    });
    for (hook, d) in futures::future::join_all(deliveries).await {
        if d.outcome == "delivered" {
            info!(webhook = %hook.name, attempts = d.attempts, "webhook delivered");
        } else {
            warn!(webhook = %hook.name, attempts = d.attempts, error = ?d.error, "webhook not delivered");
        }
        let entry = serde_json::to_vec(&d).unwrap_or_default();
        js.publish(log_subject(&project, &hook.name), entry.into())
            .await
            .map_err(nats)?
            .await
            .map_err(nats)?;
    }
    Ok(())
}

/// Runs until the stream ends; the caller's supervisor starts it again
/// after an error (the events not acknowledged come again).
pub async fn run(store: EventStore, settings: Settings) -> Result<(), NotifyError> {
    let js = store.jetstream().clone();
    let kv = js
        .get_key_value(streams::WEBHOOKS_BUCKET)
        .await
        .map_err(nats)?;
    let tasks = Repository::<Task>::new(store.clone());
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(nats)?;
    let stream = js.get_stream(streams::TASKS).await.map_err(nats)?;
    let c = stream
        .get_or_create_consumer(
            CONSUMER,
            consumer::pull::Config {
                durable_name: Some(CONSUMER.into()),
                // From when webhooks first ran: no history is delivered.
                deliver_policy: consumer::DeliverPolicy::New,
                filter_subjects: EVENTS
                    .iter()
                    .map(|t| format!("ud.task.*.{}", t.trim_start_matches("task.")))
                    .collect(),
                ack_policy: consumer::AckPolicy::Explicit,
                // Every try of every webhook of an event, with room.
                ack_wait: Duration::from_secs(15 * 60),
                max_ack_pending: 64,
                ..Default::default()
            },
        )
        .await
        .map_err(nats)?;
    let messages = c.messages().await.map_err(nats)?;
    messages
        .map(|m| m.map_err(nats))
        .for_each_concurrent(16, |m| {
            let (js, kv, tasks, http, settings) = (&js, &kv, &tasks, &http, &settings);
            async move {
                let m = match m {
                    Ok(m) => m,
                    Err(e) => {
                        warn!(error = %e, "webhook events interrupted");
                        return;
                    }
                };
                let span = info_span!("webhook", subject = %m.subject);
                let done = handle(js, kv, tasks, http, settings, &m)
                    .instrument(span)
                    .await;
                match done {
                    Ok(()) => {
                        if let Err(e) = m.ack().await {
                            warn!(error = %e, "webhook event not acknowledged; it comes again");
                        }
                    }
                    Err(e) => warn!(error = %e, "webhook event not handled; it comes again"),
                }
            }
        })
        .await;
    Err(NotifyError::Nats("the webhook events ended".into()))
}
