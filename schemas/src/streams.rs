//! JetStream stream definitions. The hub's JetStream domain is `hub`.

use std::time::Duration;

use async_nats::jetstream::stream::{Config, DiscardPolicy, RetentionPolicy, StorageType};

/// How long one pull from a consumer waits on the hub before it is asked
/// again (idle heartbeats at half of it). A restarted hub forgets pulls
/// in flight; a reader notices within about this long (the client's
/// default of 30 s left nodes without work for half a minute).
pub const PULL_EXPIRES: Duration = Duration::from_secs(3);

/// A consumer's messages, pulled [`PULL_EXPIRES`] at a time.
pub async fn pull(
    consumer: &async_nats::jetstream::consumer::PullConsumer,
) -> Result<
    async_nats::jetstream::consumer::pull::Stream,
    async_nats::jetstream::consumer::StreamError,
> {
    consumer
        .stream()
        .expires(PULL_EXPIRES)
        .heartbeat(PULL_EXPIRES / 2)
        .messages()
        .await
}

pub const TASKS: &str = "UD_TASKS";
pub const NODES: &str = "UD_NODES";
pub const HEARTBEATS: &str = "UD_HEARTBEATS";
pub const AUTH: &str = "UD_AUTH";
pub const PIPELINES: &str = "UD_PIPELINES";
pub const SCHEDULES: &str = "UD_SCHEDULES";
pub const LOGS: &str = "UD_LOGS";
/// Operational alerts (`ud.alert.>`), kept 90 days.
pub const ALERTS: &str = "UD_ALERTS";
/// Deliveries of project webhooks (`ud.webhook.<project>.<name>`), kept 7 days.
pub const WEBHOOK_LOG: &str = "UD_WEBHOOK_LOG";
/// Key-value bucket of project webhooks (key: `<project>.<name>`; value:
/// JSON [`crate::api::WebhookRecord`]).
pub const WEBHOOKS_BUCKET: &str = "ud_webhooks";
/// Key-value bucket of notices told lately (key: `quota.<project>.<limit>`),
/// each kept an hour: a project at its quota is told once an hour at most.
pub const NOTIFIED_BUCKET: &str = "ud_notified";
/// Key-value bucket mapping (project, Idempotency-Key) to the task it created.
pub const IDEMPOTENCY_BUCKET: &str = "ud_idempotency";
/// Key-value bucket of queue settings made through the API (key: queue name;
/// value: JSON `{"priority", "max_running", "updated_by", "updated_at"}`),
/// overriding `UD_QUEUES_FILE`; its history keeps the last 16 changes per queue.
pub const QUEUES_BUCKET: &str = "ud_queues";
/// Key-value bucket of compute quotas (key: project; value: JSON
/// `{"max_tasks", "max_cpu_millis", "max_memory_mb", "max_gpus",
/// "gpu_hours_per_month", "updated_by", "updated_at"}`, each limit absent
/// for none); its history keeps the last 16 changes per project.
pub const QUOTAS_BUCKET: &str = "ud_quotas";

/// Key-value bucket of project secrets (key: `<project>.<NAME>`; value: CBOR
/// `stored-secret`, the value encrypted with the main server's key). One
/// revision per key: a value set again leaves nothing of the one before.
pub const SECRETS_BUCKET: &str = "ud_secrets";

/// Streams read by projectors, in the order they are listed here.
pub const PROJECTED: [&str; 6] = [AUTH, NODES, HEARTBEATS, TASKS, PIPELINES, SCHEDULES];

fn base(name: &str, subjects: Vec<String>, replicas: usize) -> Config {
    Config {
        name: name.to_owned(),
        subjects,
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::Old,
        storage: StorageType::File,
        num_replicas: replicas,
        allow_direct: true,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    }
}

/// Task lifecycle events: kept forever (the source of truth).
pub fn tasks(replicas: usize) -> Config {
    base(TASKS, vec!["ud.task.>".into()], replicas)
}

/// Pipeline events: kept forever.
pub fn pipelines(replicas: usize) -> Config {
    base(PIPELINES, vec!["ud.pipeline.>".into()], replicas)
}

/// Schedules and their firings: kept forever.
pub fn schedules(replicas: usize) -> Config {
    base(SCHEDULES, vec!["ud.schedule.>".into()], replicas)
}

/// Node registration and liveness transitions: kept forever.
pub fn nodes(replicas: usize) -> Config {
    base(
        NODES,
        vec![
            "ud.node.*.enrolled".into(),
            "ud.node.*.revoked".into(),
            "ud.node.*.registered".into(),
            "ud.node.*.offline".into(),
            "ud.node.*.scheduling".into(),
        ],
        replicas,
    )
}

/// Heartbeats: a bounded window per node (the last 100 beats).
pub fn heartbeats(replicas: usize) -> Config {
    Config {
        max_messages_per_subject: 100,
        ..base(HEARTBEATS, vec!["ud.node.*.heartbeat".into()], replicas)
    }
}

/// Token issue and revocation: kept forever.
pub fn auth(replicas: usize) -> Config {
    base(AUTH, vec!["ud.auth.>".into()], replicas)
}

/// Run and cancel messages to nodes; each node pulls its own with a filtered consumer.
pub fn dispatch(replicas: usize) -> Config {
    Config {
        max_age: Duration::from_secs(7 * 24 * 3600),
        ..base(
            crate::edge::DISPATCH,
            vec!["ud.dispatch.>".into()],
            replicas,
        )
    }
}

/// Task output, a bounded window per task (full logs are archived elsewhere).
pub fn logs(replicas: usize) -> Config {
    Config {
        max_messages_per_subject: 100_000,
        max_age: Duration::from_secs(30 * 24 * 3600),
        ..base(LOGS, vec!["ud.log.>".into()], replicas)
    }
}

/// What nodes report, as their agents forward it (`ud.deliver.<node_id>.<rest>`),
/// stored back under the report's subject (`ud.edge.<node_id>.<rest>`).
pub fn edge_in(replicas: usize) -> Config {
    let forwarded = format!("{}*.>", crate::edge::FORWARD_PREFIX);
    Config {
        subject_transform: Some(async_nats::jetstream::stream::SubjectTransform {
            source: forwarded.clone(),
            destination: format!("{}{{{{wildcard(1)}}}}.>", crate::edge::REPORT_PREFIX),
        }),
        max_age: Duration::from_secs(7 * 24 * 3600),
        // A node's burst of reports is one batch: one acknowledgement, and
        // one sync on a hub syncing every write.
        allow_atomic_publish: true,
        ..base(crate::edge::EDGE_IN, vec![forwarded], replicas)
    }
}

/// Operational alerts such as a main-server disk running low: 90 days.
pub fn alerts(replicas: usize) -> Config {
    Config {
        max_age: Duration::from_secs(90 * 24 * 3600),
        ..base(ALERTS, vec!["ud.alert.>".into()], replicas)
    }
}

pub fn webhook_log(replicas: usize) -> Config {
    Config {
        max_age: Duration::from_secs(7 * 24 * 3600),
        ..base(WEBHOOK_LOG, vec!["ud.webhook.>".into()], replicas)
    }
}

pub fn all(replicas: usize) -> Vec<Config> {
    vec![
        alerts(replicas),
        webhook_log(replicas),
        tasks(replicas),
        nodes(replicas),
        heartbeats(replicas),
        auth(replicas),
        pipelines(replicas),
        schedules(replicas),
        dispatch(replicas),
        logs(replicas),
    ]
}
