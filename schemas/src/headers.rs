//! NATS headers carried by every event, so that a person reading a stream
//! with the NATS CLI sees what it is without decoding the CBOR payload.

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
pub const MSG_ID: &str = "Nats-Msg-Id";
pub const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";
pub const EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT: &str =
    "Nats-Expected-Last-Subject-Sequence-Subject";

pub const CBOR: &str = "application/cbor";

/// Headers of one event. The aggregate id is in the subject; the event id
/// is the `Nats-Msg-Id`.
pub fn build(event_type: &str, schema_version: u16, meta: &EventMeta) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(EVENT_TYPE, event_type);
    h.insert(SCHEMA_VERSION, schema_version.to_string().as_str());
    h.insert(CONTENT_TYPE, CBOR);
    h.insert(MSG_ID, meta.event_id.to_string().as_str());
    h.insert(CORRELATION_ID, meta.correlation_id.to_string().as_str());
    if let Some(c) = &meta.causation_id {
        h.insert(CAUSATION_ID, c.to_string().as_str());
    }
    h.insert(ACTOR, meta.actor.as_str());
    h
}

fn get<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).map(|v| v.as_str())
}

/// The schema version named in the headers (1 when absent).
pub fn schema_version(h: Option<&HeaderMap>) -> Result<u16, String> {
    match h.and_then(|h| get(h, SCHEMA_VERSION)) {
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
    let event_id = parse_id(EVENT_ID).unwrap_or_else(|| EventId(uuid::Uuid::nil()));
    EventMeta {
        event_id,
        correlation_id: parse_id(CORRELATION_ID).unwrap_or(event_id),
        causation_id: parse_id(CAUSATION_ID),
        actor: h
            .and_then(|h| get(h, ACTOR))
            .unwrap_or("unknown")
            .to_owned(),
    }
}
