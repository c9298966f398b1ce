//! The UniDesk wire contract.
//!
//! Everything that crosses a process boundary is defined here: identifiers,
//! event payloads (CBOR, versioned), the subject hierarchy, stream
//! definitions and the NATS headers that make events readable without
//! decoding. The CDDL text in `cddl/unidesk.cddl` describes the same payloads
//! for integrations in other languages.

pub mod api;
pub mod codec;
pub mod dispatch;
pub mod edge;
pub mod events;
pub mod gpu;
pub mod headers;
pub mod ids;
pub mod report;
pub mod spec;
pub mod status;
pub mod streams;
pub mod subjects;

pub use codec::{decode_event, encode_event, CodecError, EventEnvelope, EventMeta};
pub use events::{
    AuthEvent, Event, NodeEvent, PipelineEvent, ProjectEvent, Role, ScheduleEvent, SecretEvent,
    SecretRef, TaskEvent,
};
pub use ids::{EventId, IdError, NodeId, PipelineId, ProjectId, ScheduleId, TaskId, TokenId};
pub use spec::{NodeResources, Resources, RetryPolicy, TaskSpec};
pub use status::{NodeStatus, SchedulingMode, TaskStatus};

/// The CDDL text that describes every event payload, for integrations.
pub const CDDL: &str = include_str!("../cddl/unidesk.cddl");

/// Milliseconds since the Unix epoch, the only time format on the wire.
pub type Millis = i64;

/// The current time in wire format.
pub fn now_millis() -> Millis {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}
