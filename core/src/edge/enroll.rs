//! Enrolling and revoking nodes. A node's token carries its id and a secret
//! shown once; the hub keeps only a bcrypt hash of the secret.

use std::collections::BTreeMap;

use ud_schemas::codec::EventMeta;
use ud_schemas::edge::NodeToken;
use ud_schemas::NodeId;

use super::EdgeError;
use crate::aggregate::{ExecuteError, Repository, Retries};
use crate::node::{Node, NodeCommand, NodeError};
use crate::store::EventStore;

pub fn validate_name(name: &str) -> Result<(), EdgeError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(EdgeError::Invalid {
            field: "name",
            reason: "1-63 of A-Z, a-z, 0-9, '-', '_', '.'".into(),
        })
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
            return Err(EdgeError::Invalid {
                field: "labels",
                reason: format!("label {k:?}: keys 1-63 bytes, values at most 63"),
            });
        }
    }
    let token = NodeToken {
        node_id: NodeId::new(),
        secret: hex::encode(rand::random::<[u8; 32]>()),
    };
    let secret_hash = bcrypt::hash(&token.secret, super::SECRET_HASH_COST)?;
    let command = NodeCommand::Enroll {
        name: name.to_owned(),
        labels,
        secret_hash,
    };
    let done = Repository::<Node>::new(store.clone())
        .create(token.node_id, command, &EventMeta::new(actor))
        .await
        .map_err(node_error)?;
    Ok((token, done.seq))
}

fn node_error(e: ExecuteError<NodeError>) -> EdgeError {
    match e {
        ExecuteError::Rejected(e) => EdgeError::Node(e),
        ExecuteError::Hidden => EdgeError::Node(NodeError::Unknown),
        ExecuteError::Conflict => EdgeError::Store(crate::StoreError::Conflict),
        ExecuteError::Store(e) => EdgeError::Store(e),
    }
}

/// Runs an operator's command on a node (one retry after a lost race).
async fn execute(
    store: &EventStore,
    id: NodeId,
    command: NodeCommand,
    actor: &str,
) -> Result<Option<u64>, EdgeError> {
    let done = Repository::<Node>::new(store.clone())
        .execute(id, command, &EventMeta::new(actor), Retries(1), |_| true)
        .await
        .map_err(node_error)?;
    Ok((!done.events.is_empty()).then_some(done.seq))
}

/// Revokes a node: the hub drops its user, closing its connection.
pub async fn revoke(store: &EventStore, id: NodeId, actor: &str) -> Result<Option<u64>, EdgeError> {
    execute(store, id, NodeCommand::Revoke, actor).await
}

/// Cordons, drains or resumes a node.
pub async fn set_scheduling(
    store: &EventStore,
    id: NodeId,
    mode: ud_schemas::SchedulingMode,
    reason: &str,
    actor: &str,
) -> Result<Option<u64>, EdgeError> {
    let command = NodeCommand::SetScheduling {
        mode,
        reason: reason.to_owned(),
    };
    execute(store, id, command, actor).await
}

/// A node folded from `UD_NODES` (heartbeats excluded), with its last sequence there.
pub async fn load(store: &EventStore, id: &NodeId) -> Result<(Option<Node>, u64), EdgeError> {
    let loaded = Repository::<Node>::new(store.clone()).load(id).await?;
    Ok(match loaded {
        Some((n, seq)) => (Some(n), seq),
        None => (None, 0),
    })
}
