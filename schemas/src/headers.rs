//! NATS headers carried by every event, so that a person reading a stream
//! with the NATS CLI sees what it is without decoding the CBOR payload.

use async_nats::header::{HeaderName, HeaderValue};
use async_nats::HeaderMap;

use crate::codec::EventMeta;
use crate::ids::EventId;

pub const EVENT_TYPE: &str = "Ud-Event-Type";
pub const SCHEMA_VERSION: &str = "Ud-Schema-Version";
pub const CONTENT_TYPE: &str = "Content-Type";
/// The event id is the `Nats-Msg-Id` (deduplication uses it too).
pub const EVENT_ID: &str = "Nats-Msg-Id";
pub const CORRELATION_ID: &str = "Ud-Correlation-Id";
pub const CAUSATION_ID: &str = "Ud-Causation-Id";
pub const ACTOR: &str = "Ud-Actor";
/// On a node's report of a run's outcome: the attempt it is about.
pub const ATTEMPT: &str = "Ud-Attempt";
pub const MSG_ID: &str = "Nats-Msg-Id";
/// On a node's log chunk: the container engine's time of it (RFC 3339), by
/// which a restarted agent goes on after the last chunk it sent.
pub const LOG_TIME: &str = "Ud-Log-Time";
pub const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";
pub const EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT: &str =
    "Nats-Expected-Last-Subject-Sequence-Subject";

pub const CBOR: &str = "application/cbor";

// The names as async-nats values, made once: naming a header by `&str`
// validates and copies the name on every insert and lookup.
const EVENT_TYPE_NAME: HeaderName = HeaderName::from_static(EVENT_TYPE);
const SCHEMA_VERSION_NAME: HeaderName = HeaderName::from_static(SCHEMA_VERSION);
const CONTENT_TYPE_NAME: HeaderName = HeaderName::from_static(CONTENT_TYPE);
const MSG_ID_NAME: HeaderName = HeaderName::from_static(MSG_ID);
const CORRELATION_ID_NAME: HeaderName = HeaderName::from_static(CORRELATION_ID);
const CAUSATION_ID_NAME: HeaderName = HeaderName::from_static(CAUSATION_ID);
const ACTOR_NAME: HeaderName = HeaderName::from_static(ACTOR);

/// Text fit for a header: a line break would end the header (async-nats
/// refuses one by panicking), so each `\r` or `\n` becomes a space.
pub fn one_line(text: String) -> String {
    if text.contains(['\r', '\n']) {
        text.replace(['\r', '\n'], " ")
    } else {
        text
    }
}

/// A header value from text, on one line (see [`one_line`]).
pub fn value(text: String) -> HeaderValue {
    HeaderValue::from_lossy(&one_line(text))
}

/// Headers of one event. The aggregate id is in the subject; the event id
/// is the `Nats-Msg-Id`.
pub fn build(event_type: &str, schema_version: u16, meta: &EventMeta) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(EVENT_TYPE_NAME, value(event_type.to_owned()));
    h.insert(SCHEMA_VERSION_NAME, value(schema_version.to_string()));
    h.insert(CONTENT_TYPE_NAME, value(CBOR.to_owned()));
    h.insert(MSG_ID_NAME, value(meta.event_id.to_string()));
    h.insert(CORRELATION_ID_NAME, value(meta.correlation_id.to_string()));
    if let Some(c) = &meta.causation_id {
        h.insert(CAUSATION_ID_NAME, value(c.to_string()));
    }
    h.insert(ACTOR_NAME, value(meta.actor.clone()));
    h
}

fn get(h: &HeaderMap, name: HeaderName) -> Option<&str> {
    h.get(name).map(|v| v.as_str())
}

/// The schema version named in the headers (1 when absent).
pub fn schema_version(h: Option<&HeaderMap>) -> Result<u16, String> {
    match h.and_then(|h| get(h, SCHEMA_VERSION_NAME)) {
        None => Ok(1),
        Some(v) => v
            .parse()
            .map_err(|_| format!("bad {SCHEMA_VERSION} header {v:?}")),
    }
}

/// Event metadata read back from headers; missing parts get neutral values.
pub fn meta(h: Option<&HeaderMap>) -> EventMeta {
    let parse_id = |name| {
        h.and_then(|h| get(h, name))
            .and_then(|v| v.parse::<EventId>().ok())
    };
    let event_id = parse_id(MSG_ID_NAME).unwrap_or_else(|| EventId(uuid::Uuid::nil()));
    EventMeta {
        event_id,
        correlation_id: parse_id(CORRELATION_ID_NAME).unwrap_or(event_id),
        causation_id: parse_id(CAUSATION_ID_NAME),
        actor: h
            .and_then(|h| get(h, ACTOR_NAME))
            .unwrap_or("unknown")
            .to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_break_in_a_value_becomes_a_space_and_the_rest_reads_back() {
        let meta = EventMeta::new("token:first\r\nUd-Actor: forged");
        let h = build("task.submitted", 2, &meta);
        let back = super::meta(Some(&h));
        assert_eq!(back.actor, "token:first  Ud-Actor: forged");
        assert_eq!(back.event_id, meta.event_id);
        assert_eq!(back.correlation_id, meta.correlation_id);
        assert_eq!(schema_version(Some(&h)), Ok(2));
        assert_eq!(
            h.get(EVENT_TYPE).map(|v| v.as_str()),
            Some("task.submitted")
        );
    }
}
