//! Enrolling and revoking nodes. A node's token carries its id and a secret
//! shown once; the hub keeps only a bcrypt hash of the secret.

use std::collections::BTreeMap;

use ud_schemas::codec::EventMeta;
use ud_schemas::edge::NodeToken;
use ud_schemas::{now_millis, streams, subjects, Event, NodeId};

use super::EdgeError;
use crate::node::{self, NodeCommand};
use crate::store::{EventStore, Expect};

pub fn validate_name(name: &str) -> Result<(), EdgeError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(EdgeError::Invalid(
            "name: 1-63 of A-Z, a-z, 0-9, '-', '_', '.'".into(),
        ))
    }
}

/// Enrolls a node; returns its token (the only time the secret is seen) and the event's sequence.
pub async fn enroll(
    store: &EventStore,
    name: &str,
    labels: BTreeMap<String, String>,
    actor: &str,
) -> Result<(NodeToken, u64), EdgeError> {
    validate_name(name)?;
    for (k, v) in &labels {
        if k.is_empty() || k.len() > 63 || v.len() > 63 {
            return Err(EdgeError::Invalid(format!(
                "label {k:?}: keys 1-63 bytes, values at most 63"
            )));
        }
    }
    let token = NodeToken {
        node_id: NodeId::new(),
        secret: hex::encode(rand::random::<[u8; 32]>()),
    };
    let secret_hash = bcrypt::hash(&token.secret, super::SECRET_HASH_COST)
        .map_err(|e| EdgeError::Invalid(e.to_string()))?;
    let events = node::decide(
        None,
        NodeCommand::Enroll {
            name: name.to_owned(),
            labels,
            secret_hash,
        },
        now_millis(),
    )
    .map_err(|e| EdgeError::Invalid(e.to_string()))?;
    let events: Vec<Event> = events
        .into_iter()
        .map(|e| Event::Node(token.node_id, e))
        .collect();
    let seq = store
        .append_all(&events, &EventMeta::new(actor), Expect::New)
        .await?
        .unwrap_or(0);
    Ok((token, seq))
}

/// Revokes a node: the hub drops its user, closing its connection.
pub async fn revoke(store: &EventStore, id: NodeId, actor: &str) -> Result<Option<u64>, EdgeError> {
    let (node, last) = load(store, &id).await?;
    let events = node::decide(node.as_ref(), NodeCommand::Revoke, now_millis())
        .map_err(|e| EdgeError::Invalid(e.to_string()))?;
    let events: Vec<Event> = events.into_iter().map(|e| Event::Node(id, e)).collect();
    Ok(store
        .append_all(&events, &EventMeta::new(actor), Expect::LastSeq(last))
        .await?)
}

/// Cordons, drains or resumes a node (`mode`: active, cordoned, draining).
pub async fn set_scheduling(
    store: &EventStore,
    id: NodeId,
    mode: &str,
    reason: &str,
    actor: &str,
) -> Result<Option<u64>, EdgeError> {
    let (node, last) = load(store, &id).await?;
    let command = NodeCommand::SetScheduling {
        mode: mode.to_owned(),
        reason: reason.to_owned(),
    };
    let events = node::decide(node.as_ref(), command, now_millis())
        .map_err(|e| EdgeError::Invalid(e.to_string()))?;
    let events: Vec<Event> = events.into_iter().map(|e| Event::Node(id, e)).collect();
    Ok(store
        .append_all(&events, &EventMeta::new(actor), Expect::LastSeq(last))
        .await?)
}

/// A node folded from `UD_NODES` (heartbeats excluded), with its last sequence there.
pub async fn load(store: &EventStore, id: &NodeId) -> Result<(Option<node::Node>, u64), EdgeError> {
    let events = store
        .read_subject(streams::NODES, &subjects::node_all(id))
        .await?;
    let mut n = None;
    let mut last = 0;
    for e in &events {
        if let Event::Node(_, ne) = &e.envelope.event {
            n = node::evolve(n, *id, ne);
            last = e.seq;
        }
    }
    Ok((n, last))
}
