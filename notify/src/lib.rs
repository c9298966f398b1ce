//! Project webhooks: the task events a project chose (and a node going
//! offline, a project reaching its quota), POSTed to its URL,
//! signed with a key of the webhook's own, tried again with backoff, and
//! each delivery logged. Read from the task stream through a durable
//! consumer, so a delivery due when a main server stops is made after it
//! (at least once).

pub mod deliver;
pub mod sign;

use serde_json::{json, Value};
use ud_schemas::api::{FieldError, WebhookRecord};

/// The event types a webhook may ask for. `node.offline` is any node's
/// (nodes are the platform's); `quota.reached` is a task of the project
/// waiting on its quota, told once an hour at most per limit.
pub const EVENTS: [&str; 8] = [
    "task.succeeded",
    "task.failed",
    "task.timed_out",
    "task.cancelled",
    "task.lost",
    "task.retrying",
    "node.offline",
    "quota.reached",
];

/// The task events delivered as they are.
pub const TASK_EVENTS: [&str; 6] = [
    "succeeded",
    "failed",
    "timed_out",
    "cancelled",
    "lost",
    "retrying",
];

/// The formats a webhook's body may take: `email` sends it as a mail to the
/// addresses of a `mailto:` URL, through the SMTP server of the settings.
pub const FORMATS: [&str; 3] = ["json", "slack", "email"];

/// Most addresses one e-mail webhook sends to.
pub const MAX_RECIPIENTS: usize = 10;

/// The addresses of a `mailto:a@x.org,b@y.org` URL, if each is one.
pub fn recipients(url: &str) -> Option<Vec<String>> {
    let list = url.strip_prefix("mailto:")?;
    let all: Vec<String> = list.split(',').map(|a| a.trim().to_owned()).collect();
    let ok = !all.is_empty()
        && all.len() <= MAX_RECIPIENTS
        && all.iter().all(|a| {
            a.len() <= 254
                && a.parse::<lettre::Address>().is_ok()
                && !a.chars().any(|c| c.is_whitespace() || c.is_control())
        });
    ok.then_some(all)
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("nats: {0}")]
    Nats(String),
    #[error("store: {0}")]
    Store(#[from] ud_core::store::StoreError),
    #[error("settings: {0}")]
    Settings(String),
}

pub(crate) fn nats(e: impl std::fmt::Display) -> NotifyError {
    NotifyError::Nats(e.to_string())
}

/// Whether `name` may name a webhook: 1-63 of a-z, 0-9, - and _.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Where a webhook's URL goes, without what may be a credential in it:
/// its scheme and host, or how many addresses a `mailto:` names.
pub fn where_to(url: &str) -> String {
    if let Some(to) = recipients(url) {
        return format!(
            "mailto:{} address{}",
            to.len(),
            if to.len() == 1 { "" } else { "es" }
        );
    }
    match reqwest::Url::parse(url) {
        Ok(u) => format!("{}://{}/…", u.scheme(), u.host_str().unwrap_or_default()),
        Err(_) => "…".into(),
    }
}

/// Every field of a new webhook that is not acceptable.
pub fn validate(name: &str, url: &str, events: &[String], format: &str) -> Vec<FieldError> {
    let mut bad = Vec::new();
    if !valid_name(name) {
        bad.push(FieldError::new("name", "1-63 of a-z, 0-9, - and _"));
    }
    if format == "email" {
        if recipients(url).is_none() {
            bad.push(FieldError::new(
                "url",
                format!("an e-mail webhook's URL is mailto:ADDRESS[,ADDRESS...] (1-{MAX_RECIPIENTS} addresses)"),
            ));
        }
    } else {
        let scheme_ok = reqwest::Url::parse(url).is_ok_and(|u| {
            matches!(u.scheme(), "http" | "https") && u.host_str().is_some_and(|h| !h.is_empty())
        });
        if !scheme_ok || url.len() > 2048 || url.chars().any(char::is_whitespace) {
            bad.push(FieldError::new(
                "url",
                "must be an http or https URL (or mailto: with format email)",
            ));
        }
    }
    if events.is_empty() {
        bad.push(FieldError::new(
            "events",
            format!("name at least one of {}", EVENTS.join(", ")),
        ));
    } else if let Some(e) = events.iter().find(|e| !EVENTS.contains(&e.as_str())) {
        bad.push(FieldError::new(
            "events",
            format!("{e} is not one of {}", EVENTS.join(", ")),
        ));
    }
    if !FORMATS.contains(&format) {
        bad.push(FieldError::new("format", "json, slack or email"));
    }
    bad
}

/// What happened, as a delivery carries it.
#[derive(Clone, Debug)]
pub struct Happened {
    pub event_id: String,
    pub event_type: String,
    pub seq: u64,
    pub task_id: Option<String>,
    pub task_name: Option<String>,
    pub node_id: Option<String>,
    pub node_name: Option<String>,
    /// The task's project; none for a node's event.
    pub project: Option<String>,
    /// The event's fields as JSON.
    pub data: Value,
}

/// The body POSTed to `hook` for what happened.
pub fn body(hook: &WebhookRecord, h: &Happened) -> Vec<u8> {
    let v = if hook.format == "slack" {
        json!({ "text": format!("UniDesk: {}", sentence(h)) })
    } else {
        let mut v = json!({
            "id": h.event_id,
            "type": h.event_type,
            "seq": h.seq,
            "project": h.project.as_deref().unwrap_or(&hook.project),
            "webhook": hook.name,
            "data": h.data,
        });
        for (k, x) in [
            ("task_id", &h.task_id),
            ("task_name", &h.task_name),
            ("node_id", &h.node_id),
            ("node_name", &h.node_name),
        ] {
            if h.task_id.is_some() && k.starts_with("task") || x.is_some() {
                v[k] = json!(x);
            }
        }
        v
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

/// An e-mail's subject and text for what happened.
pub fn mail(hook: &WebhookRecord, h: &Happened) -> (String, String) {
    let line = sentence(h);
    let details: Value = serde_json::from_slice(&body(
        &WebhookRecord {
            format: "json".into(),
            ..hook.clone()
        },
        h,
    ))
    .unwrap_or_default();
    let text = format!(
        "{line}\n\nProject {project}, webhook {name}. The event as JSON:\n\n{json}\n",
        project = hook.project,
        name = hook.name,
        json = serde_json::to_string_pretty(&details).unwrap_or_default()
    );
    (format!("UniDesk: {line}"), text)
}

/// What happened, in one line for people.
fn sentence(h: &Happened) -> String {
    let reason = |key: &str| {
        h.data
            .get(key)
            .and_then(Value::as_str)
            .map(|r| format!(": {r}"))
            .unwrap_or_default()
    };
    let project = h.project.as_deref().unwrap_or("-");
    match h.event_type.as_str() {
        "node.offline" => format!(
            "node {} ({}) went offline",
            h.node_name.as_deref().unwrap_or("(unnamed)"),
            h.node_id.as_deref().unwrap_or("-")
        ),
        "quota.reached" => format!("project {project} reached its quota{}", reason("reason")),
        other => format!(
            "task {} ({}) in project {project} {}{}",
            h.task_name.as_deref().unwrap_or("(unnamed)"),
            h.task_id.as_deref().unwrap_or("-"),
            other.trim_start_matches("task.").replace('_', " "),
            reason("reason")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(format: &str) -> WebhookRecord {
        WebhookRecord {
            project: "lab".into(),
            name: "ci".into(),
            url: "https://hooks.example.org/x".into(),
            events: vec!["task.failed".into()],
            format: format.into(),
            secret: "s".into(),
            created_by: "token:a".into(),
            created_at: 1,
        }
    }

    fn happened() -> Happened {
        Happened {
            event_id: "e1".into(),
            event_type: "task.timed_out".into(),
            seq: 9,
            task_id: Some("t1".into()),
            task_name: Some("train".into()),
            node_id: None,
            node_name: None,
            project: Some("lab".into()),
            data: json!({"at": 5, "reason": "ran past 60 s"}),
        }
    }

    #[test]
    fn bad_fields_are_named_each() {
        let ok = validate("ci", "https://x.org/h", &["task.failed".into()], "json");
        assert!(ok.is_empty(), "{ok:?}");
        let bad = validate("CI!", "ftp://x.org", &["task.exploded".into()], "xml");
        let fields: Vec<&str> = bad.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["name", "url", "events", "format"]);
        assert!(bad[2].reason.contains("task.exploded"));
        assert_eq!(validate("ci", "http://", &[], "json").len(), 2);
        assert_eq!(
            validate(
                "ci",
                "mailto:ops@example.org",
                &["task.lost".into()],
                "json"
            )[0]
            .field,
            "url"
        );
        assert!(validate("ci", "http://a b", &["task.lost".into()], "json")[0].field == "url");
        // E-mail: a mailto: URL of addresses, and only with format email.
        let ok = validate(
            "ops",
            "mailto:ops@example.org, ada@lab.example.org",
            &["task.failed".into()],
            "email",
        );
        assert!(ok.is_empty(), "{ok:?}");
        assert_eq!(
            recipients("mailto:ops@example.org,ada@lab.example.org"),
            Some(vec![
                "ops@example.org".to_owned(),
                "ada@lab.example.org".to_owned()
            ])
        );
        for url in [
            "mailto:",
            "mailto:not-an-address",
            "https://x.org/h",
            "mailto:a@x.org\r\nBcc: b@y.org",
        ] {
            let bad = validate("ops", url, &["task.failed".into()], "email");
            assert_eq!(bad.len(), 1, "{url}: {bad:?}");
            assert_eq!(bad[0].field, "url");
        }
        assert_eq!(
            where_to("https://hooks.slack.com/services/T0/B0/secret"),
            "https://hooks.slack.com/…"
        );
        assert_eq!(where_to("mailto:a@x.org,b@y.org"), "mailto:2 addresses");
        let many: Vec<String> = (0..11).map(|i| format!("u{i}@x.org")).collect();
        assert!(recipients(&format!("mailto:{}", many.join(","))).is_none());
        assert_eq!(
            validate(
                "ops",
                "mailto:ops@example.org",
                &["task.failed".into()],
                "json"
            )[0]
            .field,
            "url"
        );
    }

    #[test]
    fn a_slack_body_says_what_happened_in_one_line() {
        let v: Value =
            serde_json::from_slice(&body(&hook("slack"), &happened())).unwrap_or_default();
        assert_eq!(
            v["text"],
            "UniDesk: task train (t1) in project lab timed out: ran past 60 s"
        );
        let v: Value =
            serde_json::from_slice(&body(&hook("json"), &happened())).unwrap_or_default();
        assert_eq!(v["type"], "task.timed_out");
        assert_eq!(v["data"]["reason"], "ran past 60 s");
        assert_eq!(v["webhook"], "ci");
        assert_eq!(v["task_id"], "t1");
        assert!(v.get("node_id").is_none(), "{v}");
        let node = Happened {
            event_type: "node.offline".into(),
            task_id: None,
            task_name: None,
            node_id: Some("n1".into()),
            node_name: Some("gpu-1".into()),
            project: None,
            ..happened()
        };
        let v: Value = serde_json::from_slice(&body(&hook("slack"), &node)).unwrap_or_default();
        assert_eq!(v["text"], "UniDesk: node gpu-1 (n1) went offline");
        let v: Value = serde_json::from_slice(&body(&hook("json"), &node)).unwrap_or_default();
        assert_eq!(
            (v["node_name"].as_str(), v.get("task_id")),
            (Some("gpu-1"), None)
        );
        assert_eq!(v["project"], "lab", "the webhook's project: {v}");
        let quota = Happened {
            event_type: "quota.reached".into(),
            data: json!({"reason": "project lab holds 2 of its quota of 2 GPUs; this task asks for 1"}),
            ..happened()
        };
        let v: Value = serde_json::from_slice(&body(&hook("slack"), &quota)).unwrap_or_default();
        assert_eq!(
            v["text"],
            "UniDesk: project lab reached its quota: project lab holds 2 of its quota of 2 GPUs; this task asks for 1"
        );
        let (subject, text) = mail(&hook("email"), &happened());
        assert_eq!(
            subject,
            "UniDesk: task train (t1) in project lab timed out: ran past 60 s"
        );
        assert!(text.contains("\"type\": \"task.timed_out\""), "{text}");
    }
}
