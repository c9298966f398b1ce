//! Names of everything one compute node owns, on its leaf server and on the hub.
//!
//! | what | name |
//! | --- | --- |
//! | the leaf's JetStream domain | `n<hex>` (hex = node id without dashes) |
//! | the leaf's event stream | `EDGE_<hex>`, subjects `ud.edge.<node_id>.>` |
//! | its durable forward consumer | `hub` (pull), read by the node's agent |
//! | what the agent forwards each report to | `ud.deliver.<node_id>.<rest>` for `ud.edge.<node_id>.<rest>` |
//! | the hub stream taking all nodes' reports | `UD_EDGE_IN`, subjects `ud.deliver.*.>` stored as `ud.edge.<node_id>.<rest>` |
//! | dispatches to the node | stream `UD_DISPATCH`, subjects `ud.dispatch.<node_id>.<task_id>.<kind>`, pull consumer `node_<hex>` |
//! | the agent's inbox prefix | `_INBOX.<hex>` (answers from the hub), `_LOCAL.<hex>` (its own leaf's JetStream) |
//! | tunnel frames to the node | `ud.tunnel.<node_id>.to.<connection>` (core NATS) |
//! | tunnel frames from the node | `ud.tunnel.<node_id>.from.<connection>` (core NATS) |
//!
//! Events a node reports are published as `ud.edge.<node_id>.<canonical suffix>`:
//! `ud.edge.<node_id>.node.heartbeat` becomes `ud.node.<node_id>.heartbeat`,
//! `ud.edge.<node_id>.task.<task_id>.started` becomes `ud.task.<task_id>.started`
//! once the hub has checked that the node may say so.

use crate::ids::NodeId;

pub const EDGE_IN: &str = "UD_EDGE_IN";
pub const DISPATCH: &str = "UD_DISPATCH";
/// The durable pull consumer on a node's stream through which its agent
/// forwards reports to the hub.
pub const FORWARD_CONSUMER: &str = "hub";
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

/// What every subject a node forwards to the hub starts with.
pub const FORWARD_PREFIX: &str = "ud.deliver.";

/// The subject a node forwards its report on `ud.edge.<node_id>.<rest>`
/// to: `ud.deliver.<node_id>.<rest>`. Its permissions on the hub allow only
/// its own id there, and `UD_EDGE_IN` stores it back under the report's
/// subject, so the node a stored report names is the node that sent it.
pub fn forward_subject(report: &str) -> Option<String> {
    report
        .strip_prefix(REPORT_PREFIX)
        .map(|rest| format!("{FORWARD_PREFIX}{rest}"))
}

/// Everything one node may forward: `ud.deliver.<node_id>.>`.
pub fn forward_filter(node: &NodeId) -> String {
    format!("{FORWARD_PREFIX}{node}.>")
}

/// Header of a forwarded report: its sequence in the node's stream.
pub const ORIGIN_SEQ: &str = "Ud-Origin-Seq";

/// The inbox prefix of the agent's connection for its own leaf server's
/// JetStream (its stream, its forward consumer): never allowed on the hub,
/// so the leaf server keeps those subscriptions to itself instead of
/// telling the hub of each.
pub fn local_inbox_prefix(node: &NodeId) -> String {
    format!("_LOCAL.{}", hex(node))
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

/// Tunnels (sessions, `exec`, port forwarding) are core NATS, never
/// JetStream: frames to the node on `ud.tunnel.<node_id>.to.<connection>`,
/// from it on `ud.tunnel.<node_id>.from.<connection>`.
pub const TUNNEL_PREFIX: &str = "ud.tunnel";

/// The subjects of frames to `node`, without the connection (`….to`).
pub fn tunnel_to(node: &NodeId) -> String {
    format!("{TUNNEL_PREFIX}.{node}.to")
}

/// The subjects of frames from `node`, without the connection (`….from`).
pub fn tunnel_from(node: &NodeId) -> String {
    format!("{TUNNEL_PREFIX}.{node}.from")
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

/// How a node's leaf server reaches the hub: always encrypted, except by an
/// explicit choice for loopback tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HubLink {
    /// TLS on the hub's leaf-node port: `tls://host:port` (or `host:port`).
    Tls { host: String, port: u16 },
    /// A WebSocket over HTTPS through the hub's HTTPS entry:
    /// `wss://host[:port]` (443 by default). The leaf server asks for
    /// `/leafnode` there; the entry forwards that path to the hub.
    WebSocket { host: String, port: u16 },
    /// No encryption: `nats-leaf://host:port`. Loopback tests only.
    Plain { host: String, port: u16 },
}

fn host_port(rest: &str, default_port: Option<u16>) -> Result<(String, u16), String> {
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("port {p:?} is not a number"))?,
        ),
        None => (
            rest,
            default_port.ok_or_else(|| format!("{rest:?} has no port"))?,
        ),
    };
    if host.is_empty() || host.contains(['/', '@', ' ']) {
        return Err(format!("{host:?} is not a host name"));
    }
    Ok((host.to_owned(), port))
}

impl std::str::FromStr for HubLink {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (scheme, rest) = s.split_once("://").unwrap_or(("tls", s));
        match scheme {
            "tls" => host_port(rest, None).map(|(host, port)| Self::Tls { host, port }),
            "wss" => {
                let rest = rest.strip_suffix('/').unwrap_or(rest);
                if rest.contains('/') {
                    return Err(format!(
                        "{s}: give the hub's HTTPS entry without a path (the leaf server asks for /leafnode there)"
                    ));
                }
                host_port(rest, Some(443)).map(|(host, port)| Self::WebSocket { host, port })
            }
            "nats-leaf" => host_port(rest, None).map(|(host, port)| Self::Plain { host, port }),
            "ws" | "nats" => Err(format!(
                "{s} would carry the link in clear: use tls://host:port or wss://host"
            )),
            other => Err(format!(
                "{other}:// is not a hub link: use tls://host:port or wss://host"
            )),
        }
    }
}

impl HubLink {
    pub fn is_plain(&self) -> bool {
        matches!(self, Self::Plain { .. })
    }

    /// The remote's URL, with the node's credentials.
    fn url(&self, user: &str, password: &str) -> String {
        match self {
            Self::Tls { host, port } => format!("tls://{user}:{password}@{host}:{port}"),
            Self::WebSocket { host, port } => format!("wss://{user}:{password}@{host}:{port}"),
            Self::Plain { host, port } => format!("nats-leaf://{user}:{password}@{host}:{port}"),
        }
    }
}

/// A node's reconnect interval to the hub, between 1 and 10 s and fixed by
/// its id: after a hub restart (or a revocation, which closes every link)
/// nodes come back spread over those seconds instead of all at once, as a
/// shared interval would have them (nats-server has one interval for all of
/// a server's remotes and no jitter of its own).
pub fn reconnect_millis(node: &NodeId) -> u64 {
    let spread = node
        .0
        .as_bytes()
        .iter()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(*b)));
    1000 + spread % 9000
}

/// The leaf nats-server configuration of a node's Provider Gateway: its own
/// JetStream domain, the outbound leaf link to the hub with the node's
/// credentials, and a loopback client port for the agent only.
/// `client_host` is loopback on a plain host; inside a compose network it is
/// the container's own address, still unreachable from task containers
/// (they run without a network).
pub struct LeafSettings<'a> {
    pub hub: &'a HubLink,
    /// The CA the hub's certificate must chain to (none: the system's roots).
    pub hub_ca_file: Option<&'a str>,
    pub store_dir: &'a str,
    pub client_host: &'a str,
    pub client_port: u16,
    pub agent_password: &'a str,
}

pub fn leaf_config(token: &NodeToken, s: &LeafSettings<'_>) -> String {
    format!(
        "server_name: edge-{}\nhost: {}\nport: {}\njetstream {{\n  store_dir: {:?}\n  domain: {}\n}}\n{}",
        hex(&token.node_id),
        s.client_host,
        s.client_port,
        s.store_dir,
        domain(&token.node_id),
        leaf_link_config(token, s.hub, s.hub_ca_file, s.agent_password)
    )
}

/// The leaf link and the agent's account, without the server's own settings.
pub fn leaf_link_config(
    token: &NodeToken,
    hub: &HubLink,
    hub_ca_file: Option<&str>,
    agent_password: &str,
) -> String {
    let url = hub.url(&token.node_id.to_string(), &token.secret);
    let tls = match hub_ca_file {
        Some(ca) if !hub.is_plain() => format!(", tls: {{ ca_file: {ca:?} }}"),
        _ => String::new(),
    };
    format!(
        "leafnodes {{\n  reconnect: \"{}ms\"\n  remotes: [ {{ urls: [{url:?}], account: UD{tls} }} ]\n}}\n\
         accounts {{\n  UD {{\n    jetstream: enabled\n    users: [ {{ user: agent, password: {agent_password:?} }} ]\n  }}\n}}\n",
        reconnect_millis(&token.node_id)
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
        assert_eq!(
            forward_subject(&edge).as_deref(),
            Some(format!("ud.deliver.{n}.task.{t}.started").as_str())
        );
        assert_eq!(forward_subject("ud.node.x.heartbeat"), None);
        assert!(!domain(&n).contains('-'));
    }

    #[test]
    fn hub_links_are_encrypted_unless_plain_is_spelled_out() {
        let tls = |h: &str, p| HubLink::Tls {
            host: h.into(),
            port: p,
        };
        assert_eq!(
            "hub.example.org:7422".parse(),
            Ok(tls("hub.example.org", 7422))
        );
        assert_eq!("tls://10.0.0.1:7422".parse(), Ok(tls("10.0.0.1", 7422)));
        assert_eq!(
            "wss://hub.example.org".parse(),
            Ok(HubLink::WebSocket {
                host: "hub.example.org".into(),
                port: 443
            })
        );
        assert_eq!(
            "wss://hub.example.org:8443/".parse(),
            Ok(HubLink::WebSocket {
                host: "hub.example.org".into(),
                port: 8443
            })
        );
        assert!("nats-leaf://127.0.0.1:7422"
            .parse::<HubLink>()
            .is_ok_and(|l| l.is_plain()));
        for bad in [
            "ws://h:80",
            "nats://h:4222",
            "wss://h/leafnode",
            "h",
            "tls://:7422",
            "http://h:1",
        ] {
            assert!(bad.parse::<HubLink>().is_err(), "{bad}");
        }
        let token = NodeToken {
            node_id: NodeId::new(),
            secret: "s".into(),
        };
        let conf = leaf_link_config(&token, &tls("h", 1), Some("/ca.pem"), "pw");
        assert!(
            conf.contains("tls://") && conf.contains("ca_file: \"/ca.pem\""),
            "{conf}"
        );
        let plain = HubLink::Plain {
            host: "h".into(),
            port: 1,
        };
        assert!(!leaf_link_config(&token, &plain, Some("/ca.pem"), "pw").contains("tls"));
    }

    #[test]
    fn reconnects_spread_over_nine_seconds() {
        let ms: Vec<u64> = (0..2000)
            .map(|_| reconnect_millis(&NodeId::new()))
            .collect();
        assert!(ms.iter().all(|m| (1000..10_000).contains(m)));
        // Every second of the range gets some of them.
        for second in 1..10 {
            assert!(
                ms.iter().any(|m| m / 1000 == second),
                "none in second {second}"
            );
        }
    }
}
