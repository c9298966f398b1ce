//! CBOR encoding of events, with versioned decoding.
//!
//! The payload of a message is the CBOR map of one event's data. The event
//! type is the last subject token; the schema version is the
//! `Ud-Schema-Version` header. Every version ever published stays decodable:
//! when a payload changes shape, the old shape is frozen in a module `vN`
//! here and upcast to the current type on read.

use async_nats::HeaderMap;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::events::*;
use crate::ids::EventId;
use crate::subjects::{self, ParsedSubject};

/// The schema version written for new events of a type.
pub fn current_version(event: &Event) -> u16 {
    match event {
        Event::Node(_, NodeEvent::Heartbeat(_)) => 2,
        _ => 1,
    }
}

/// Frozen shapes of earlier versions, upcast to the current types on read.
pub mod v1 {
    use serde::Deserialize;

    use crate::events::NodeHeartbeat;
    use crate::Millis;

    #[derive(Deserialize)]
    pub struct NodeHeartbeatV1 {
        pub at: Millis,
        pub running_tasks: u32,
    }

    impl From<NodeHeartbeatV1> for NodeHeartbeat {
        fn from(v: NodeHeartbeatV1) -> Self {
            Self {
                at: v.at,
                running_tasks: v.running_tasks,
                disk_free_mb: None,
                low_disk: false,
                gpus: None,
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("subject {0:?} is not an event subject")]
    Subject(String),
    #[error("unknown event type {kind}.{name}")]
    UnknownType { kind: &'static str, name: String },
    #[error("unsupported schema version {version} of {event_type}")]
    UnknownVersion { event_type: String, version: u16 },
    #[error("bad header: {0}")]
    Header(String),
    #[error("cannot decode {event_type} v{version}: {reason}")]
    Decode {
        event_type: String,
        version: u16,
        reason: String,
    },
    #[error("cannot encode event: {0}")]
    Encode(String),
}

/// Who did what, and why: carried in headers next to every event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventMeta {
    pub event_id: EventId,
    pub correlation_id: EventId,
    pub causation_id: Option<EventId>,
    pub actor: String,
}

impl EventMeta {
    /// Metadata for an event that starts a new chain of causation.
    pub fn new(actor: impl Into<String>) -> Self {
        let id = EventId::new();
        Self {
            event_id: id,
            correlation_id: id,
            causation_id: None,
            actor: actor.into(),
        }
    }

    /// Metadata for a further event caused by this one.
    pub fn next(&self) -> Self {
        Self {
            event_id: EventId::new(),
            correlation_id: self.correlation_id,
            causation_id: Some(self.event_id),
            actor: self.actor.clone(),
        }
    }
}

/// An event as read from a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventEnvelope {
    pub event: Event,
    pub meta: EventMeta,
    pub schema_version: u16,
}

fn to_cbor<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(256);
    ciborium::into_writer(value, &mut out).map_err(|e| CodecError::Encode(e.to_string()))?;
    Ok(out)
}

/// The CBOR payload of an event, in the current schema version.
pub fn encode_event(event: &Event) -> Result<Vec<u8>, CodecError> {
    match event {
        Event::Task(_, e) => to_cbor(e),
        Event::Node(_, e) => to_cbor(e),
        Event::Auth(_, e) => to_cbor(e),
        Event::Secret(_, e) => to_cbor(e),
        Event::Pipeline(_, e) => to_cbor(e),
        Event::Schedule(_, e) => to_cbor(e),
        Event::Project(_, e) => to_cbor(e),
    }
}

/// Headers and payload of an event, ready to publish.
pub fn encode_message(event: &Event, meta: &EventMeta) -> Result<(HeaderMap, Vec<u8>), CodecError> {
    let headers = crate::headers::build(&event.event_type(), current_version(event), meta);
    Ok((headers, encode_event(event)?))
}

fn from_cbor<T: DeserializeOwned>(
    bytes: &[u8],
    event_type: &str,
    version: u16,
) -> Result<T, CodecError> {
    ciborium::from_reader(bytes).map_err(|e| CodecError::Decode {
        event_type: event_type.to_owned(),
        version,
        reason: e.to_string(),
    })
}

/// Decodes the payload of a message on `subject` written with `version`.
pub fn decode_event(subject: &str, version: u16, payload: &[u8]) -> Result<Event, CodecError> {
    let parsed = subjects::parse(subject).ok_or_else(|| CodecError::Subject(subject.to_owned()))?;
    let event_type = match &parsed {
        ParsedSubject::Task { name, .. } => format!("task.{name}"),
        ParsedSubject::Node { name, .. } => format!("node.{name}"),
        ParsedSubject::Token { name, .. } => format!("token.{name}"),
        ParsedSubject::Secret { name, .. } => format!("secret.{name}"),
        ParsedSubject::Pipeline { name, .. } => format!("pipeline.{name}"),
        ParsedSubject::Schedule { name, .. } => format!("schedule.{name}"),
        ParsedSubject::Project { name, .. } => format!("project.{name}"),
    };
    let known = match event_type.as_str() {
        "node.heartbeat" => version == 1 || version == 2,
        _ => version == 1,
    };
    if !known {
        return Err(CodecError::UnknownVersion {
            event_type,
            version,
        });
    }
    let t = event_type.as_str();
    let v = version;
    Ok(match parsed {
        ParsedSubject::Task { id, name } => Event::Task(
            id,
            match name {
                "submitted" => TaskEvent::Submitted(from_cbor(payload, t, v)?),
                "waiting" => TaskEvent::Waiting(from_cbor(payload, t, v)?),
                "assigned" => TaskEvent::Assigned(from_cbor(payload, t, v)?),
                "preparing" => TaskEvent::Preparing(from_cbor(payload, t, v)?),
                "prepared" => TaskEvent::Prepared(from_cbor(payload, t, v)?),
                "outputs" => TaskEvent::Outputs(from_cbor(payload, t, v)?),
                "started" => TaskEvent::Started(from_cbor(payload, t, v)?),
                "succeeded" => TaskEvent::Succeeded(from_cbor(payload, t, v)?),
                "failed" => TaskEvent::Failed(from_cbor(payload, t, v)?),
                "timed_out" => TaskEvent::TimedOut(from_cbor(payload, t, v)?),
                "lost" => TaskEvent::Lost(from_cbor(payload, t, v)?),
                "disconnected" => TaskEvent::Disconnected(from_cbor(payload, t, v)?),
                "reconnected" => TaskEvent::Reconnected(from_cbor(payload, t, v)?),
                "retrying" => TaskEvent::Retrying(from_cbor(payload, t, v)?),
                "reprioritized" => TaskEvent::Reprioritized(from_cbor(payload, t, v)?),
                "cancel_requested" => TaskEvent::CancelRequested(from_cbor(payload, t, v)?),
                "cancelled" => TaskEvent::Cancelled(from_cbor(payload, t, v)?),
                other => {
                    return Err(CodecError::UnknownType {
                        kind: "task",
                        name: other.to_owned(),
                    })
                }
            },
        ),
        ParsedSubject::Node { id, name } => Event::Node(
            id,
            match name {
                "enrolled" => NodeEvent::Enrolled(from_cbor(payload, t, v)?),
                "revoked" => NodeEvent::Revoked(from_cbor(payload, t, v)?),
                "registered" => NodeEvent::Registered(from_cbor(payload, t, v)?),
                "heartbeat" if v == 1 => {
                    NodeEvent::Heartbeat(from_cbor::<v1::NodeHeartbeatV1>(payload, t, v)?.into())
                }
                "heartbeat" => NodeEvent::Heartbeat(from_cbor(payload, t, v)?),
                "offline" => NodeEvent::WentOffline(from_cbor(payload, t, v)?),
                "scheduling" => NodeEvent::Scheduling(from_cbor(payload, t, v)?),
                other => {
                    return Err(CodecError::UnknownType {
                        kind: "node",
                        name: other.to_owned(),
                    })
                }
            },
        ),
        ParsedSubject::Token { id, name } => Event::Auth(
            id,
            match name {
                "issued" => AuthEvent::TokenIssued(from_cbor(payload, t, v)?),
                "revoked" => AuthEvent::TokenRevoked(from_cbor(payload, t, v)?),
                other => {
                    return Err(CodecError::UnknownType {
                        kind: "token",
                        name: other.to_owned(),
                    })
                }
            },
        ),
        ParsedSubject::Secret { secret, name } => Event::Secret(
            secret,
            match name {
                "set" => SecretEvent::Set(from_cbor(payload, t, v)?),
                "deleted" => SecretEvent::Deleted(from_cbor(payload, t, v)?),
                other => {
                    return Err(CodecError::UnknownType {
                        kind: "secret",
                        name: other.to_owned(),
                    })
                }
            },
        ),
        ParsedSubject::Pipeline { id, name } => Event::Pipeline(
            id,
            match name {
                "submitted" => PipelineEvent::Submitted(from_cbor(payload, t, v)?),
                "steps_started" => PipelineEvent::StepsStarted(from_cbor(payload, t, v)?),
                "step_ended" => PipelineEvent::StepEnded(from_cbor(payload, t, v)?),
                "step_skipped" => PipelineEvent::StepSkipped(from_cbor(payload, t, v)?),
                "cancel_requested" => PipelineEvent::CancelRequested(from_cbor(payload, t, v)?),
                "rerun" => PipelineEvent::Rerun(from_cbor(payload, t, v)?),
                "ended" => PipelineEvent::Ended(from_cbor(payload, t, v)?),
                other => {
                    return Err(CodecError::UnknownType {
                        kind: "pipeline",
                        name: other.to_owned(),
                    })
                }
            },
        ),
        ParsedSubject::Schedule { id, name } => Event::Schedule(
            id,
            match name {
                "created" => ScheduleEvent::Created(from_cbor(payload, t, v)?),
                "fired" => ScheduleEvent::Fired(from_cbor(payload, t, v)?),
                "skipped" => ScheduleEvent::Skipped(from_cbor(payload, t, v)?),
                "paused" => ScheduleEvent::Paused(from_cbor(payload, t, v)?),
                "resumed" => ScheduleEvent::Resumed(from_cbor(payload, t, v)?),
                "deleted" => ScheduleEvent::Deleted(from_cbor(payload, t, v)?),
                other => {
                    return Err(CodecError::UnknownType {
                        kind: "schedule",
                        name: other.to_owned(),
                    })
                }
            },
        ),
        ParsedSubject::Project { project, name } => Event::Project(
            project,
            match name {
                "created" => ProjectEvent::Created(from_cbor(payload, t, v)?),
                "member_added" => ProjectEvent::MemberAdded(from_cbor(payload, t, v)?),
                "role_changed" => ProjectEvent::RoleChanged(from_cbor(payload, t, v)?),
                "member_removed" => ProjectEvent::MemberRemoved(from_cbor(payload, t, v)?),
                "archived" => ProjectEvent::Archived(from_cbor(payload, t, v)?),
                other => {
                    return Err(CodecError::UnknownType {
                        kind: "project",
                        name: other.to_owned(),
                    })
                }
            },
        ),
    })
}

/// Decodes a whole message (subject, headers, payload) into an envelope.
pub fn decode_message(
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> Result<EventEnvelope, CodecError> {
    let schema_version = crate::headers::schema_version(headers).map_err(CodecError::Header)?;
    let event = decode_event(subject, schema_version, payload)?;
    Ok(EventEnvelope {
        event,
        meta: crate::headers::meta(headers),
        schema_version,
    })
}

/// The event's data as JSON, for APIs and exports.
pub fn event_data_json(event: &Event) -> serde_json::Value {
    let value = match event {
        Event::Task(_, e) => serde_json::to_value(e),
        Event::Node(_, e) => serde_json::to_value(e),
        Event::Auth(_, e) => serde_json::to_value(e),
        Event::Secret(_, e) => serde_json::to_value(e),
        Event::Pipeline(_, e) => serde_json::to_value(e),
        Event::Schedule(_, e) => serde_json::to_value(e),
        Event::Project(_, e) => serde_json::to_value(e),
    };
    value.unwrap_or(serde_json::Value::Null)
}
