//! Names of everything one compute node owns, on its leaf server and on the hub.
//!
//! | what | name |
//! | --- | --- |
//! | the leaf's JetStream domain | `n<hex>` (hex = node id without dashes) |
//! | the leaf's event stream | `EDGE_<hex>`, subjects `ud.edge.<node_id>.>` |
//! | its durable source consumer | `hub`, delivering to `ud.deliver.<node_id>.events` |
//! | the hub stream sourcing all nodes | `UD_EDGE_IN` |
//! | dispatches to the node | stream `UD_DISPATCH`, subjects `ud.dispatch.<node_id>.<task_id>.<kind>`, pull consumer `node_<hex>` |
//! | the agent's inbox prefix | `_INBOX.<hex>` |
//!
//! Events a node reports are published as `ud.edge.<node_id>.<canonical suffix>`:
//! `ud.edge.<node_id>.node.heartbeat` becomes `ud.node.<node_id>.heartbeat`,
//! `ud.edge.<node_id>.task.<task_id>.started` becomes `ud.task.<task_id>.started`
//! once the hub has checked that the node may say so.

use crate::ids::NodeId;

pub const EDGE_IN: &str = "UD_EDGE_IN";
pub const DISPATCH: &str = "UD_DISPATCH";
pub const SOURCE_CONSUMER: &str = "hub";
pub const HUB_DOMAIN: &str = "hub";

pub fn hex(node: &NodeId) -> String {
    node.0.simple().to_string()
}

pub fn domain(node: &NodeId) -> String {
    format!("n{}", hex(node))
}

pub fn stream(node: &NodeId) -> String {
    format!("EDGE_{}", hex(node))
}

pub fn stream_subjects(node: &NodeId) -> String {
    format!("ud.edge.{node}.>")
}

pub fn deliver_subject(node: &NodeId) -> String {
    format!("ud.deliver.{node}.events")
}

pub fn inbox_prefix(node: &NodeId) -> String {
    format!("_INBOX.{}", hex(node))
}

pub fn dispatch_consumer(node: &NodeId) -> String {
    format!("node_{}", hex(node))
}

pub fn dispatch_filter(node: &NodeId) -> String {
    format!("ud.dispatch.{node}.>")
}

/// `run` or `cancel` for one task on one node.
pub fn dispatch_subject(node: &NodeId, task: &crate::TaskId, kind: &str) -> String {
    format!("ud.dispatch.{node}.{task}.{kind}")
}

/// Where a node asks for the credentials of a repository (request/reply).
pub const GIT_CREDENTIALS_PREFIX: &str = "ud.git.credentials";

pub fn git_credentials_subject(node: &NodeId) -> String {
    format!("{GIT_CREDENTIALS_PREFIX}.{node}")
}

/// Where a node asks for presigned URLs to move a task's files (request/reply).
pub const STORAGE_PREFIX: &str = "ud.storage";

pub fn storage_subject(node: &NodeId) -> String {
    format!("{STORAGE_PREFIX}.{node}")
}

/// Where a node asks for the values of one run's project secrets (request/reply).
pub const SECRETS_PREFIX: &str = "ud.secrets";

pub fn secrets_subject(node: &NodeId) -> String {
    format!("{SECRETS_PREFIX}.{node}")
}

/// Where a node checks that an assignment is still current (request/reply).
pub const ASSIGNMENT_PREFIX: &str = "ud.assignment";

pub fn assignment_subject(node: &NodeId) -> String {
    format!("{ASSIGNMENT_PREFIX}.{node}")
}

/// What every subject a node reports on starts with.
pub const REPORT_PREFIX: &str = "ud.edge.";

/// The subject a node reports on, in its own stream, for the canonical
/// subject `ud.<rest>`: `ud.edge.<node_id>.<rest>`.
pub fn report_subject(node: &NodeId, canonical: &str) -> String {
    let rest = canonical.strip_prefix("ud.").unwrap_or(canonical);
    format!("{REPORT_PREFIX}{node}.{rest}")
}

/// Splits `ud.edge.<node_id>.<rest>` into the node and the canonical subject `ud.<rest>`.
pub fn canonical_subject(edge: &str) -> Option<(NodeId, String)> {
    let rest = edge.strip_prefix(REPORT_PREFIX)?;
    let (node, tail) = rest.split_once('.')?;
    Some((node.parse().ok()?, format!("ud.{tail}")))
}

pub const TOKEN_PREFIX: &str = "udn";

/// What a node's Provider Gateway is started with: `udn.<node_id>.<secret>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeToken {
    pub node_id: NodeId,
    pub secret: String,
}

impl NodeToken {
    pub fn encode(&self) -> String {
        format!("{TOKEN_PREFIX}.{}.{}", self.node_id, self.secret)
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = s.trim().splitn(3, '.');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(TOKEN_PREFIX), Some(id), Some(secret))
                if !secret.is_empty() && secret.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                Ok(Self {
                    node_id: id
                        .parse()
                        .map_err(|_| "node token: bad node id".to_owned())?,
                    secret: secret.to_owned(),
                })
            }
            _ => Err("node token must look like udn.<node id>.<hex secret>".to_owned()),
        }
    }
}

/// The leaf nats-server configuration of a node's Provider Gateway: its own
/// JetStream domain, the outbound leaf link to the hub with the node's
/// credentials, and a loopback client port for the agent only.
/// `client_host` is loopback on a plain host; inside a compose network it is
/// the container's own address, still unreachable from task containers
/// (they run without a network).
pub fn leaf_config(
    token: &NodeToken,
    hub_host: &str,
    hub_leaf_port: u16,
    store_dir: &str,
    client_host: &str,
    client_port: u16,
    agent_password: &str,
) -> String {
    format!(
        "server_name: edge-{}\nhost: {client_host}\nport: {client_port}\njetstream {{\n  store_dir: {store_dir:?}\n  domain: {}\n}}\n{}",
        hex(&token.node_id),
        domain(&token.node_id),
        leaf_link_config(token, hub_host, hub_leaf_port, agent_password)
    )
}

/// The leaf link and the agent's account, without the server's own settings.
pub fn leaf_link_config(
    token: &NodeToken,
    hub_host: &str,
    hub_leaf_port: u16,
    agent_password: &str,
) -> String {
    let url = format!(
        "nats-leaf://{}:{}@{hub_host}:{hub_leaf_port}",
        token.node_id, token.secret
    );
    format!(
        "leafnodes {{\n  reconnect: \"1s\"\n  remotes: [ {{ urls: [{url:?}], account: UD }} ]\n}}\n\
         accounts {{\n  UD {{\n    jetstream: enabled\n    users: [ {{ user: agent, password: {agent_password:?} }} ]\n  }}\n}}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edge_subjects_round_trip() {
        let n = NodeId::new();
        let t = crate::TaskId::new();
        let canonical = crate::subjects::task_event(&t, "started");
        let edge = report_subject(&n, &canonical);
        assert_eq!(canonical_subject(&edge), Some((n, canonical)));
        assert_eq!(canonical_subject("ud.edge.bad.node.heartbeat"), None);
        assert!(!domain(&n).contains('-'));
    }
}
